"""IDX reading/writing, the MNIST and digits loaders, ImageData scaling and the flip augmentation.

MNIST tests write their own small IDX files into tmp_path; the real data is never needed."""
import gzip

import numpy as np
import pytest
import torch

from steinops.data import (
    IMAGE_DATASETS, ImageData, load_digits, load_image_data, load_mnist, random_flip, read_idx, write_idx,
)

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


# ------------------------------------------------------------------------------------------ IDX

@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4), (0, 2), (1, 2, 1, 3)])
def test_idx_round_trip(tmp_path, dtype, shape, compress):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    a = (rng.integers(info.min, info.max, size=shape, endpoint=True) if info else rng.normal(size=shape) * 1e3)
    a = a.astype(dtype)
    p = tmp_path / "a.idx"
    write_idx(p, a, compress=compress)
    assert (p.read_bytes()[:2] == b"\x1f\x8b") == compress
    b = read_idx(p)
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative
    assert b.shape == shape
    np.testing.assert_array_equal(a, b)


def test_idx_known_bytes_big_endian(tmp_path):
    # written by hand from the format description, so the writer is not checked against itself
    p = tmp_path / "h.idx"
    p.write_bytes(bytes([0, 0, 0x0B, 2, 0, 0, 0, 1, 0, 0, 0, 2, 0x01, 0x02, 0xFF, 0xFE]))
    np.testing.assert_array_equal(read_idx(p), np.array([[0x0102, -2]], dtype=np.int16))
    write_idx(tmp_path / "w.idx", np.array([[0x0102, -2]], dtype="<i2"))
    assert (tmp_path / "w.idx").read_bytes() == p.read_bytes()


def test_idx_gzip_detected_by_content_not_name(tmp_path):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(tmp_path / "plain.gz", a)               # raw bytes under a .gz name
    write_idx(tmp_path / "zipped", a, compress=True)  # gzip without the suffix
    np.testing.assert_array_equal(read_idx(tmp_path / "plain.gz"), a)
    np.testing.assert_array_equal(read_idx(tmp_path / "zipped"), a)


def test_idx_write_rejects_bad_arrays(tmp_path):
    with pytest.raises(TypeError, match="dtype"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.uint16))
    with pytest.raises(TypeError, match="dtype"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match="dimensions"):
        write_idx(tmp_path / "x", np.float32(1.0))


def _valid_bytes():
    return bytes([0, 0, 0x08, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(6))


@pytest.mark.parametrize("case, data, match", [
    ("short", b"\x00\x00\x08", "too short"),
    ("short_dims", bytes([0, 0, 0x08, 3, 0, 0, 0, 2]), "too short"),
    ("magic", bytes([0, 1]) + _valid_bytes()[2:], "magic"),
    ("dtype", bytes([0, 0, 0x0A]) + _valid_bytes()[3:], "dtype code 0x0A"),
    ("zero_dims", bytes([0, 0, 0x08, 0]), "zero dim"),
    ("truncated", _valid_bytes()[:-1], "truncated"),
    ("trailing", _valid_bytes() + b"\x00\x07", "2 trailing bytes"),
])
@pytest.mark.parametrize("compress", [False, True])
def test_idx_malformed_raises_with_file_name(tmp_path, case, data, match, compress):
    p = tmp_path / f"bad_{case}.idx"
    p.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(ValueError, match=match) as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_idx_valid_bytes_fixture_reads(tmp_path):
    # the malformed cases above are small edits of these bytes, which must themselves be valid
    p = tmp_path / "ok.idx"
    p.write_bytes(_valid_bytes())
    np.testing.assert_array_equal(read_idx(p), np.arange(6, dtype=np.uint8).reshape(2, 3))


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_idx_truncated_gzip_raises_with_file_name(tmp_path, cut):
    p = tmp_path / "cut.idx.gz"
    write_idx(p, np.random.default_rng(0).integers(0, 256, size=(20, 28, 28)).astype(np.uint8), compress=True)
    blob = p.read_bytes()
    p.write_bytes(blob[: int(len(blob) * cut)])
    with pytest.raises(ValueError, match="gzip") as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_idx_corrupt_gzip_raises_with_file_name(tmp_path):
    p = tmp_path / "flip.idx.gz"
    write_idx(p, np.arange(1000, dtype=np.int32), compress=True)
    blob = bytearray(p.read_bytes())
    blob[-6] ^= 0xFF  # inside the CRC32 / size trailer
    p.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="gzip") as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_idx_missing_file(tmp_path):
    p = tmp_path / "nope.idx"
    with pytest.raises(FileNotFoundError, match="nope.idx"):
        read_idx(p)


# ------------------------------------------------------------------------------------------ MNIST

N_TRAIN, N_TEST = 37, 23


@pytest.fixture
def mnist_dir(tmp_path):
    """37 train images (gzipped) + 23 t10k images (raw) of random uint8 with labels 0..9.

    Returns (root, images (60, 28, 28) uint8, labels (60,)) in the order the loader concatenates."""
    rng = np.random.default_rng(7)
    imgs = rng.integers(0, 256, size=(N_TRAIN + N_TEST, 28, 28), dtype=np.uint8)
    imgs[0] = 0
    imgs[1] = 255  # make sure both extremes occur
    labels = rng.integers(0, 10, size=N_TRAIN + N_TEST).astype(np.uint8)
    root = tmp_path / "mnist"
    root.mkdir()
    write_idx(root / "train-images-idx3-ubyte.gz", imgs[:N_TRAIN], compress=True)
    write_idx(root / "train-labels-idx1-ubyte.gz", labels[:N_TRAIN], compress=True)
    write_idx(root / "t10k-images-idx3-ubyte", imgs[N_TRAIN:])
    write_idx(root / "t10k-labels-idx1-ubyte", labels[N_TRAIN:])
    return root, imgs, labels


def _match_rows(data, raw):
    """For every image of data (train then held-out), the index of the raw image it came from."""
    flat = torch.from_numpy(raw.reshape(len(raw), -1).astype(np.float32)) / 255
    got = torch.cat([data.to_unit(data.train), data.to_unit(data.heldout)]).reshape(len(raw), -1)
    # random 784-pixel images are distinct, so each matches exactly one source image
    return torch.cdist(got, flat).argmin(1).numpy()


def test_mnist_shapes_split_and_exact_values(mnist_dir):
    root, imgs, labels = mnist_dir
    d = load_mnist(root, heldout=0.25, seed=3)
    n = N_TRAIN + N_TEST
    assert isinstance(d, ImageData) and d.name == "mnist"
    assert d.heldout.shape == (15, 1, 28, 28) and d.train.shape == (n - 15, 1, 28, 28)
    assert d.train.dtype == d.heldout.dtype == torch.float32
    assert d.train_labels.dtype == d.heldout_labels.dtype == torch.int64
    assert d.train_labels.shape == (n - 15,) and d.heldout_labels.shape == (15,)
    assert d.shape == (1, 28, 28) and d.dim == 784 and d.pixel_levels == 256
    idx = _match_rows(d, imgs)
    assert sorted(idx) == list(range(n))  # a partition of all 60 images, both splits used
    expect = torch.from_numpy(imgs[idx].astype(np.float32)).unsqueeze(1) / 255  # exactly k / 255
    got = torch.cat([d.train, d.heldout])
    assert torch.equal(got, expect)
    # labels travel with their images
    got_labels = torch.cat([d.train_labels, d.heldout_labels]).numpy()
    np.testing.assert_array_equal(got_labels, labels[idx].astype(np.int64))
    assert got.min() == 0 and got.max() == 1


def test_mnist_pm1_scale(mnist_dir):
    root, imgs, _ = mnist_dir
    d = load_mnist(root, scale="pm1", heldout=10)
    idx = _match_rows(d, imgs)
    got = torch.cat([d.train, d.heldout])
    k = torch.from_numpy(imgs[idx].astype(np.float32)).unsqueeze(1)
    torch.testing.assert_close(got, 2 * k / 255 - 1, rtol=0, atol=1e-6)
    assert got.min() == -1 and got.max() == 1
    assert d.bin_width == pytest.approx(2 / 255)
    assert d.heldout.shape[0] == 10


def test_mnist_split_determinism(mnist_dir):
    root, _, _ = mnist_dir
    a, b, c = load_mnist(root, seed=0), load_mnist(root, seed=0), load_mnist(root, seed=1)
    assert torch.equal(a.train, b.train) and torch.equal(a.heldout_labels, b.heldout_labels)
    assert not torch.equal(a.heldout, c.heldout)
    assert a.heldout.shape[0] == round(0.2 * 60)


def test_mnist_pad_to_32(mnist_dir):
    root, _, _ = mnist_dir
    plain = load_mnist(root, scale="pm1")
    padded = load_mnist(root, scale="pm1", pad_to=32)
    assert padded.shape == (1, 32, 32) and padded.train.shape[0] == plain.train.shape[0]
    assert torch.equal(padded.train[..., 2:30, 2:30], plain.train)  # symmetric: 2 on each side
    border = padded.train.clone()
    border[..., 2:30, 2:30] = 0
    assert border[..., :2, :].eq(-1).all() and border[..., 30:, :].eq(-1).all()
    assert border[..., :, :2].eq(-1).all() and border[..., :, 30:].eq(-1).all()
    with pytest.raises(ValueError, match="pad_to"):
        load_mnist(root, pad_to=31)
    with pytest.raises(ValueError, match="pad_to"):
        load_mnist(root, pad_to=20)


def test_mnist_single_split(mnist_dir):
    root, _, _ = mnist_dir
    (root / "train-images-idx3-ubyte.gz").unlink()
    d = load_mnist(root, heldout=3)
    assert d.train.shape[0] + d.heldout.shape[0] == N_TEST


def test_mnist_count_mismatch(mnist_dir):
    root, _, labels = mnist_dir
    write_idx(root / "t10k-labels-idx1-ubyte", labels[: N_TEST - 1])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte") as e:
        load_mnist(root)
    assert "22 labels for 23 images" in str(e.value)


def test_mnist_bad_labels_and_images(mnist_dir):
    root, imgs, labels = mnist_dir
    bad = labels[N_TRAIN:].copy()
    bad[0] = 10
    write_idx(root / "t10k-labels-idx1-ubyte", bad)
    with pytest.raises(ValueError, match="t10k-labels.*0..9"):
        load_mnist(root)
    write_idx(root / "t10k-labels-idx1-ubyte", labels[N_TRAIN:])
    write_idx(root / "t10k-images-idx3-ubyte", imgs[N_TRAIN:, :27])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
        load_mnist(root)
    write_idx(root / "t10k-images-idx3-ubyte", imgs[N_TRAIN:].astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_mnist(root)


def test_mnist_missing(tmp_path, mnist_dir):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_mnist(tmp_path / "does_not_exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*t10k-images-idx3-ubyte"):
        load_mnist(empty)
    root, _, _ = mnist_dir
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_mnist(root)


def test_mnist_corrupt_file_is_named(mnist_dir):
    root, _, _ = mnist_dir
    p = root / "train-images-idx3-ubyte.gz"
    blob = p.read_bytes()
    p.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        load_mnist(root)


@pytest.mark.parametrize("heldout", [0.0, 1.0, -0.1, 0, 60, -3, True, "0.2", None])
def test_bad_heldout(mnist_dir, heldout):
    root, _, _ = mnist_dir
    with pytest.raises(ValueError, match="heldout"):
        load_mnist(root, heldout=heldout)


def test_heldout_extremes(mnist_dir):
    root, _, _ = mnist_dir
    assert load_mnist(root, heldout=1).heldout.shape[0] == 1
    assert load_mnist(root, heldout=59).train.shape[0] == 1
    assert load_mnist(root, heldout=0.001).heldout.shape[0] == 1  # a tiny fraction still holds one out
    assert load_mnist(root, heldout=0.999).train.shape[0] == 1


# ------------------------------------------------------------------------------------------ digits

@pytest.mark.parametrize("scale", ["01", "pm1"])
def test_digits(scale):
    pytest.importorskip("sklearn")
    d = load_digits(scale=scale)
    lo = 0.0 if scale == "01" else -1.0
    assert d.name == "digits" and d.shape == (1, 8, 8) and d.dim == 64
    assert d.train.shape[0] + d.heldout.shape[0] == 1797
    assert d.heldout.shape[0] == round(0.2 * 1797)
    allx = torch.cat([d.train, d.heldout])
    assert allx.min() == lo and allx.max() == 1
    assert d.pixel_levels == 17 and len(torch.unique(allx)) == 17
    assert d.bin_width == pytest.approx((1 - lo) / 16)
    # every value sits on the grid lo + k * bin_width
    k = (allx - lo) / d.bin_width
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-5)
    assert sorted(torch.cat([d.train_labels, d.heldout_labels]).unique().tolist()) == list(range(10))


def test_digits_split_and_labels_match_sklearn():
    datasets = pytest.importorskip("sklearn.datasets")
    bunch = datasets.load_digits()
    d = load_digits(heldout=100, seed=5)
    perm = np.random.default_rng(5).permutation(1797)
    expect = torch.from_numpy(bunch.images[perm[:100]]).float().unsqueeze(1) / 16
    assert torch.equal(d.heldout, expect)
    np.testing.assert_array_equal(d.heldout_labels.numpy(), bunch.target[perm[:100]])
    np.testing.assert_array_equal(d.train_labels.numpy(), bunch.target[perm[100:]])
    assert not torch.equal(d.heldout, load_digits(heldout=100, seed=6).heldout)


# ------------------------------------------------------------------------------------------ ImageData

def _tiny(scale, levels=256):
    x = torch.zeros(2, 1, 2, 2)
    return ImageData("t", x, x[:1], torch.zeros(2, dtype=torch.long), torch.zeros(1, dtype=torch.long), scale, levels)


@pytest.mark.parametrize("scale", ["01", "pm1"])
def test_unit_round_trip(scale):
    d = _tiny(scale)
    u = torch.rand(5, 1, 2, 2)
    torch.testing.assert_close(d.to_unit(d.from_unit(u)), u)
    x = d.from_unit(u)
    torch.testing.assert_close(d.from_unit(d.to_unit(x)), x)
    lo = 0.0 if scale == "01" else -1.0
    torch.testing.assert_close(d.from_unit(torch.tensor([0.0, 1.0])), torch.tensor([lo, 1.0]))
    assert d.bin_width == pytest.approx((1 - lo) / 255)


def test_imagedata_validates():
    with pytest.raises(ValueError, match="scale"):
        _tiny("0-1")
    with pytest.raises(ValueError, match="pixel_levels"):
        _tiny("01", levels=1)


# ------------------------------------------------------------------------------------------ flips

def test_random_flip_flips_exactly_the_chosen():
    x = torch.randn(64, 3, 5, 7)
    out = random_flip(x, generator=torch.Generator().manual_seed(11), p=0.5)
    chosen = torch.rand(64, generator=torch.Generator().manual_seed(11)) < 0.5  # the documented rule
    assert 10 < chosen.sum() < 54
    assert torch.equal(out[chosen], x[chosen].flip(-1))
    assert torch.equal(out[~chosen], x[~chosen])
    assert not torch.equal(out[chosen], x[chosen])  # random images are not mirror-symmetric
    assert torch.equal(random_flip(x, p=0.0), x)
    assert torch.equal(random_flip(x, p=1.0), x.flip(-1))
    assert x.shape == out.shape


def test_random_flip_validates():
    with pytest.raises(ValueError, match="x"):
        random_flip(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="p"):
        random_flip(torch.zeros(2, 1, 8, 8), p=1.5)


# ------------------------------------------------------------------------------------------ dispatch

def test_load_image_data_dispatch(mnist_dir):
    root, _, _ = mnist_dir
    assert set(IMAGE_DATASETS) == {"digits", "mnist"}
    d = load_image_data("mnist", root=root, scale="pm1", heldout=5, seed=2, pad_to=32)
    ref = load_mnist(root, scale="pm1", heldout=5, seed=2, pad_to=32)
    assert torch.equal(d.train, ref.train) and torch.equal(d.heldout_labels, ref.heldout_labels)
    with pytest.raises(ValueError, match="root"):
        load_image_data("mnist")
    with pytest.raises(ValueError, match="name"):
        load_image_data("cifar10", root=root)
    with pytest.raises(ValueError, match="scale"):
        load_image_data("mnist", root=root, scale="0-255")


def test_load_image_data_digits_ignores_root(tmp_path):
    pytest.importorskip("sklearn")
    d = load_image_data("digits", root=tmp_path / "whatever", heldout=0.5)
    assert d.name == "digits" and d.shape == (1, 8, 8)
    with pytest.raises(ValueError, match="scale"):
        load_image_data("digits", scale="01x")
