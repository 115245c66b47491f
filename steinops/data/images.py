"""Small image data sets for the score-model training driver, as ``ImageData`` bundles.

Raw intensities are integers k in 0..K-1 (K = ``pixel_levels``) and are mapped to float32 by

    scale "01":   x = k / (K - 1)            in [0, 1]
    scale "pm1":  x = 2 k / (K - 1) - 1      in [-1, 1]

Images are (N, C, H, W). Train / held-out splits come from one permutation drawn with
``numpy.random.default_rng(seed)``, so a seed fixes the split on every machine.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .idx import read_idx

__all__ = ["IMAGE_DATASETS", "ImageData", "load_digits", "load_image_data", "load_mnist", "random_flip"]

SCALES = ("01", "pm1")


@dataclass(eq=False)  # eq=False: comparing tensors field by field is ambiguous
class ImageData:
    """An image data set split into train and held-out parts.

    Fields:
        name: data set name.
        train: (N, C, H, W) float32 images in the data range of ``scale``.
        heldout: (N_h, C, H, W) float32 images, disjoint from ``train``.
        train_labels: (N,) int64 class labels of ``train``.
        heldout_labels: (N_h,) int64 class labels of ``heldout``.
        scale: ``"01"`` (data in [0, 1]) or ``"pm1"`` (data in [-1, 1]).
        pixel_levels: K, the number of distinct raw intensities (17 for sklearn digits, 256 for MNIST).
    """

    name: str
    train: Tensor
    heldout: Tensor
    train_labels: Tensor
    heldout_labels: Tensor
    scale: str
    pixel_levels: int

    def __post_init__(self):
        _check_scale(self.scale)
        if isinstance(self.pixel_levels, bool) or not isinstance(self.pixel_levels, int) or self.pixel_levels < 2:
            raise ValueError(f"pixel_levels must be an int >= 2, got {self.pixel_levels!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train.shape[1:])

    @property
    def dim(self) -> int:
        """C * H * W, the dimension of a flattened image."""
        c, h, w = self.shape
        return c * h * w

    @property
    def bin_width(self) -> float:
        """Width of one quantisation bin in data units: 1/(K-1) for "01", 2/(K-1) for "pm1"."""
        return (1.0 if self.scale == "01" else 2.0) / (self.pixel_levels - 1)

    def to_unit(self, x: Tensor) -> Tensor:
        """Map data-range values to [0, 1]: identity for "01", (x + 1) / 2 for "pm1"."""
        return x if self.scale == "01" else (x + 1) / 2

    def from_unit(self, x: Tensor) -> Tensor:
        """Inverse of ``to_unit``: identity for "01", 2 x - 1 for "pm1"."""
        return x if self.scale == "01" else 2 * x - 1

    def __repr__(self) -> str:
        return (f"ImageData(name={self.name!r}, train={tuple(self.train.shape)}, "
                f"heldout={tuple(self.heldout.shape)}, scale={self.scale!r}, pixel_levels={self.pixel_levels})")


# ----------------------------------------------------------------------------------------- helpers

def _check_scale(scale) -> None:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def _heldout_count(heldout, n: int) -> int:
    """Number of held-out images: a fraction in (0, 1) of n (rounded, kept in [1, n-1]) or an int count."""
    if n < 2:
        raise ValueError(f"need at least 2 images to split into train and held-out, got {n}")
    if isinstance(heldout, (bool, np.bool_)):
        raise ValueError(f"heldout must be a fraction in (0, 1) or an int count, got {heldout!r}")
    if isinstance(heldout, (int, np.integer)):
        if not 1 <= heldout <= n - 1:
            raise ValueError(f"heldout count must be in [1, {n - 1}] for {n} images, got {heldout}")
        return int(heldout)
    if isinstance(heldout, (float, np.floating)):
        if not 0.0 < heldout < 1.0:
            raise ValueError(f"heldout fraction must be in (0, 1), got {heldout}")
        return min(max(round(heldout * n), 1), n - 1)
    raise ValueError(f"heldout must be a fraction in (0, 1) or an int count, got {type(heldout).__name__} {heldout!r}")


def _scale_raw(raw: np.ndarray, levels: int, scale: str) -> Tensor:
    """(N, H, W) raw integers 0..levels-1 -> (N, 1, H, W) float32 in the range of ``scale``."""
    k = torch.from_numpy(np.ascontiguousarray(raw)).to(torch.float32).unsqueeze(1)
    return k / (levels - 1) if scale == "01" else (2 * k) / (levels - 1) - 1


def _build(name, raw, labels, levels, *, scale, heldout, seed) -> ImageData:
    """Scale raw (N, H, W) images and split them (and their labels) with one seeded permutation."""
    _check_scale(scale)
    n = raw.shape[0]
    n_h = _heldout_count(heldout, n)
    perm = np.random.default_rng(seed).permutation(n)
    h_idx, t_idx = perm[:n_h], perm[n_h:]
    # index the raw uint8 first: fancy indexing copies, so do it on the 4x smaller array
    lab = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return ImageData(
        name=name,
        train=_scale_raw(raw[t_idx], levels, scale),
        heldout=_scale_raw(raw[h_idx], levels, scale),
        train_labels=lab[torch.from_numpy(t_idx)],
        heldout_labels=lab[torch.from_numpy(h_idx)],
        scale=scale,
        pixel_levels=levels,
    )


def _pad(raw: np.ndarray, pad_to) -> np.ndarray:
    """Zero-pad (N, H, W) raw images symmetrically to (N, pad_to, pad_to); 0 is the data minimum."""
    if pad_to is None:
        return raw
    if isinstance(pad_to, bool) or not isinstance(pad_to, (int, np.integer)):
        raise ValueError(f"pad_to must be None or an int, got {pad_to!r}")
    h, w = raw.shape[1:]
    if pad_to < max(h, w) or (pad_to - h) % 2 or (pad_to - w) % 2:
        raise ValueError(f"pad_to must be >= the image size {h}x{w} and differ from it by an even number "
                         f"(symmetric padding), got {pad_to}")
    ph, pw = (pad_to - h) // 2, (pad_to - w) // 2
    return np.pad(raw, ((0, 0), (ph, ph), (pw, pw)))


# ----------------------------------------------------------------------------------------- loaders

def load_digits(*, scale: str = "01", heldout=0.2, seed: int = 0) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1,797 images, raw values 0..16, no download), shape (1, 8, 8).

    ``heldout`` is a fraction in (0, 1) or an int count in [1, N-1]; ``seed`` fixes the split.
    """
    _check_scale(scale)
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn") from e
    bunch = _sk_load_digits()
    raw = bunch.images.astype(np.uint8)  # float64 holding integers 0..16
    return _build("digits", raw, bunch.target, 17, scale=scale, heldout=heldout, seed=seed)


MNIST_SPLITS = ("train", "t10k")
MNIST_SIZE = 28


def _find(root: Path, stem: str) -> Path | None:
    """``root/stem`` or ``root/stem.gz``, whichever exists (raw first: it reads faster)."""
    for cand in (root / stem, root / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def _read_mnist_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one split: images (N, 28, 28) uint8 and labels (N,) in 0..9."""
    images = read_idx(images_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (MNIST_SIZE, MNIST_SIZE):
        raise ValueError(f"{images_path}: expected (N, {MNIST_SIZE}, {MNIST_SIZE}) uint8 images, "
                         f"got {images.shape} {images.dtype}")
    labels = read_idx(labels_path)
    if labels.ndim != 1 or labels.dtype.kind not in "ui":
        raise ValueError(f"{labels_path}: expected (N,) integer labels, got {labels.shape} {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{labels_path}: labels must be in 0..9, got range {labels.min()}..{labels.max()}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images in {images_path}")
    return images, labels


def load_mnist(root, *, scale: str = "01", heldout=0.2, seed: int = 0, pad_to: int | None = None) -> ImageData:
    """MNIST from the standard IDX files in directory ``root``, shape (1, 28, 28) or (1, pad_to, pad_to).

    Every split found (``train``, then ``t10k``; files ``{split}-images-idx3-ubyte`` and
    ``{split}-labels-idx1-ubyte``, each optionally ``.gz``) is read and concatenated, then split into
    train / held-out exactly as ``load_digits`` does. ``pad_to`` (e.g. 32) zero-pads the raw images
    symmetrically, so the border takes the data minimum (0 for "01", -1 for "pm1").
    """
    _check_scale(scale)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(errno.ENOENT, "MNIST root directory not found", os.fspath(root))
    all_images, all_labels, searched = [], [], []
    for split in MNIST_SPLITS:
        img_stem, lab_stem = f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"
        searched += [img_stem, f"{img_stem}.gz"]
        img_path = _find(root, img_stem)
        if img_path is None:
            continue
        lab_path = _find(root, lab_stem)
        if lab_path is None:
            raise FileNotFoundError(f"{img_path} has no labels file: searched {lab_stem}[.gz] in {root}")
        images, labels = _read_mnist_split(img_path, lab_path)
        all_images.append(images)
        all_labels.append(labels)
    if not all_images:
        raise FileNotFoundError(f"no MNIST image files in {root}: searched {', '.join(searched)}")
    raw = _pad(np.concatenate(all_images), pad_to)
    labels = np.concatenate(all_labels)
    return _build("mnist", raw, labels, 256, scale=scale, heldout=heldout, seed=seed)


def random_flip(x: Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> Tensor:
    """Flip a random subset of a batch (N, C, H, W) horizontally (along W); returns a new tensor.

    Image i is flipped iff ``u[i] < p`` with ``u = torch.rand(N, generator=generator)`` drawn on the
    generator's device (CPU when None). Digits are not mirror-symmetric, so this is off by default.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (N, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    dev = generator.device if generator is not None else torch.device("cpu")
    flip = (torch.rand(x.shape[0], generator=generator, device=dev) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


IMAGE_DATASETS = {"digits": load_digits, "mnist": load_mnist}


def load_image_data(name: str, *, root=None, scale: str = "01", heldout=0.2, seed: int = 0,
                    pad_to: int | None = None) -> ImageData:
    """Load the data set ``name`` (a key of ``IMAGE_DATASETS``).

    ``mnist`` needs ``root`` (the directory of IDX files); ``digits`` ignores ``root`` and takes no ``pad_to``.
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(f"name must be one of {sorted(IMAGE_DATASETS)}, got {name!r}")
    if name == "digits":
        if pad_to is not None:
            raise ValueError(f"pad_to applies only to mnist, got pad_to={pad_to!r} for digits")
        return load_digits(scale=scale, heldout=heldout, seed=seed)
    if root is None:
        raise ValueError("root is required for mnist: the directory holding the IDX files")
    return load_mnist(root, scale=scale, heldout=heldout, seed=seed, pad_to=pad_to)
