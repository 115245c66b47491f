"""Image-sample metrics that need no download: a small classifier trained on the data set itself supplies
the feature space, in which the Fréchet distance and the kernel (MMD) distance are computed.

    FeatureClassifier        conv3x3-32, conv3x3-64 /2, conv3x3-128 /2, global average pool, a feature
                             layer (128-d by default), a linear layer to the class logits
    train_classifier         Adam + cross-entropy with random-shift augmentation, deterministic per seed
    cached_classifier        the same, trained once and cached as ``cache_dir/<key>.pt`` (keyed on the data)
    frechet_distance         |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2})  of Gaussian fits
    kernel_inception_distance  unbiased MMD^2 with k(x, y) = (x.y / F + 1)^3, averaged over random subsets
    nearest_neighbour_ratios memorisation check in pixel space (nearest training image of each sample)
    image_metrics            all of the above for one set of samples
    save_image_grid          a PNG grid of images

The distances live in the feature space of THIS classifier, not of Inception-v3: they are "FD" and "KID"
in that space (e.g. "FD-digits"), comparable between models scored with the same classifier only, and
never comparable with published FID / KID numbers.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import os
import tempfile
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import Tensor, nn

__all__ = [
    "FeatureClassifier", "cached_classifier", "frechet_distance", "image_metrics", "kernel_inception_distance",
    "nearest_neighbour_ratios", "save_image_grid", "train_classifier",
]

_CHUNK_ELEMENTS = 2**22  # pair distances per cdist block
_FEATURE_BATCH = 512     # images per classifier forward pass


# ---- argument checks ---------------------------------------------------------------------------------------

def _images(name: str, x, min_rows: int = 1) -> Tensor:
    """``x`` as a finite floating (N, C, H, W) tensor with N >= min_rows."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} images, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _labels(name: str, y, n: int) -> Tensor:
    if not isinstance(y, Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1:
        raise TypeError(f"{name} must be an integer tensor of shape (N,), got "
                        f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
    if y.shape[0] != n:
        raise ValueError(f"{name} must have {n} entries (one per image), got {y.shape[0]}")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name} must be non-negative class indices, got min {int(y.min())}")
    return y.long()


def _features(name: str, x, min_rows: int = 2) -> np.ndarray:
    """``x`` (a tensor or array) as a finite float64 (N, F) numpy array with N >= min_rows."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.number) or x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must be a numeric (N, F) array or tensor, got shape {x.shape} dtype {x.dtype}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows (samples), got shape {x.shape}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _positive_float(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite positive number, got {v!r}")
    return float(v)


# ---- the feature classifier --------------------------------------------------------------------------------

class FeatureClassifier(nn.Module):
    """A small CNN for (C, H, W) images, H, W from 8 to 32 (any size >= 4 works: the pool is global).

    conv3x3(C->w1) -> conv3x3(w1->w2, stride 2) -> conv3x3(w2->w3, stride 2), each BatchNorm + ReLU;
    global average pool -> Linear(w3 -> feature_dim) + ReLU (``features``) -> Linear(feature_dim -> n_classes).

    Args:
        in_channels: C.   n_classes: number of classes.   feature_dim: F, width of the feature layer.
        widths: (w1, w2, w3) conv channels.
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 10, *, feature_dim: int = 128,
                 widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        in_channels, n_classes = _positive_int("in_channels", in_channels), _positive_int("n_classes", n_classes)
        feature_dim = _positive_int("feature_dim", feature_dim)
        if len(widths) != 3:
            raise ValueError(f"widths must be three conv widths (w1, w2, w3), got {widths!r}")
        w1, w2, w3 = (_positive_int("widths", w) for w in widths)
        self.config = dict(in_channels=in_channels, n_classes=n_classes, feature_dim=feature_dim,
                           widths=(w1, w2, w3))

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(*block(in_channels, w1, 1), *block(w1, w2, 2), *block(w2, w3, 2),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature = nn.Sequential(nn.Linear(w3, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, n_classes)

    def features(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, F): the penultimate layer, the feature space of the Fréchet distance."""
        return self.feature(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, n_classes) logits."""
        return self.head(self.features(x))


def _random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image by an integer offset in [-max_shift, max_shift]^2 (zero fill), one offset per image."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)  # (n, w)
    idx = torch.arange(n, device=x.device)[:, None, None]
    # padded[i, :, rows[i, a], cols[i, b]] for all a, b
    out = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]]  # (n, h, w, C)
    return out.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def _accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], _FEATURE_BATCH):
        correct += int((model(images[i:i + _FEATURE_BATCH]).argmax(1) == labels[i:i + _FEATURE_BATCH]).sum())
    model.train(was_training)
    return correct / images.shape[0]


def train_classifier(images: Tensor, labels: Tensor, *, heldout_images: Tensor, heldout_labels: Tensor,
                     epochs: int = 20, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                     max_shift: int | None = None, feature_dim: int = 128, progress: bool = False
                     ) -> tuple[FeatureClassifier, float]:
    """Train a :class:`FeatureClassifier` with Adam on the cross-entropy, with random shifts as augmentation.

    Args:
        images: (N, C, H, W) floating training images.   labels: (N,) integer classes.
        heldout_images, heldout_labels: the same for the held-out set used to report the accuracy.
        epochs, batch_size, lr: Adam on mini-batches of a fresh random order each epoch; the learning rate
            follows a cosine decay to 0 over the run.
        seed: initial weights, batch order and shifts all come from it (deterministic on one machine).
        max_shift: largest shift in pixels (default max(1, H // 8)); 0 disables the augmentation.
        feature_dim: width F of the feature layer.
        progress: a tqdm bar over the epochs.

    Returns:
        (model in eval mode, held-out accuracy in [0, 1]). n_classes = 1 + the largest label seen.
    """
    images = _images("images", images)
    labels = _labels("labels", labels, images.shape[0])
    heldout_images = _images("heldout_images", heldout_images)
    heldout_labels = _labels("heldout_labels", heldout_labels, heldout_images.shape[0])
    if heldout_images.shape[1:] != images.shape[1:]:
        raise ValueError(f"heldout_images must have image shape {tuple(images.shape[1:])}, "
                         f"got {tuple(heldout_images.shape[1:])}")
    epochs, batch_size = _positive_int("epochs", epochs), _positive_int("batch_size", batch_size)
    lr = _positive_float("lr", lr)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    max_shift = max(1, images.shape[2] // 8) if max_shift is None else max_shift
    if isinstance(max_shift, bool) or not isinstance(max_shift, numbers.Integral) or max_shift < 0:
        raise ValueError(f"max_shift must be a non-negative integer, got {max_shift!r}")

    n_classes = int(max(labels.max(), heldout_labels.max())) + 1
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(int(seed))
        model = FeatureClassifier(images.shape[1], n_classes, feature_dim=feature_dim)
    model = model.to(device=images.device, dtype=images.dtype)
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = images.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=epochs, desc="classifier", leave=False)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(images.device)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            if idx.numel() < 2:  # BatchNorm needs two images
                continue
            xb = _random_shift(images[idx], int(max_shift), gen)
            loss = F.cross_entropy(model(xb), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    return model, _accuracy(model, heldout_images, heldout_labels)


def _fingerprint(tensors: dict[str, Tensor], train_kw: dict) -> str:
    """Shapes, dtypes and a SHA-256 of the tensors' bytes, plus the training options (so other data or
    other options retrain instead of reusing the cache)."""
    h = hashlib.sha256()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    kw = {k: v for k, v in sorted(train_kw.items()) if k != "progress"}
    h.update(repr(kw).encode())
    return h.hexdigest()


def _atomic_torch_save(obj, path: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cached_classifier(cache_dir, key: str, images: Tensor, labels: Tensor, heldout_images: Tensor,
                      heldout_labels: Tensor, **train_kw) -> tuple[FeatureClassifier, float]:
    """:func:`train_classifier` once, cached as ``cache_dir/<key>.pt``.

    The file holds the state dict, the model config, the held-out accuracy and a fingerprint of the data
    (shapes, dtypes and a SHA-256 of images, labels, heldout_images, heldout_labels) and of ``train_kw``;
    a file whose fingerprint differs (another data set or other options), or that cannot be read, is
    retrained and overwritten. Written atomically (temporary file in ``cache_dir``, then ``os.replace``).

    Returns:
        (model in eval mode on images' device and dtype, held-out accuracy).
    """
    if not isinstance(key, str) or not key or os.sep in key or (os.altsep and os.altsep in key) or key in (".", ".."):
        raise ValueError(f"key must be a non-empty file name without path separators, got {key!r}")
    tensors = {"images": _images("images", images), "labels": labels,
               "heldout_images": _images("heldout_images", heldout_images), "heldout_labels": heldout_labels}
    for name in ("labels", "heldout_labels"):
        if not isinstance(tensors[name], Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensors[name]).__name__}")
    fingerprint = _fingerprint(tensors, train_kw)
    cache_dir = os.fspath(cache_dir)
    path = os.path.join(cache_dir, f"{key}.pt")
    if os.path.exists(path):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("fingerprint") == fingerprint:
                cfg = dict(blob["config"])
                model = FeatureClassifier(cfg.pop("in_channels"), cfg.pop("n_classes"), **cfg)
                model.load_state_dict(blob["state_dict"])
                return model.to(device=images.device, dtype=images.dtype).eval(), float(blob["accuracy"])
        except Exception:  # unreadable or stale format: retrain below
            pass
    model, acc = train_classifier(images, labels, heldout_images=heldout_images, heldout_labels=heldout_labels,
                                  **train_kw)
    os.makedirs(cache_dir, exist_ok=True)
    cfg = dict(model.config, widths=list(model.config["widths"]))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _atomic_torch_save({"state_dict": state, "config": cfg, "accuracy": acc, "fingerprint": fingerprint,
                        "shapes": {k: list(v.shape) for k, v in tensors.items()}}, path)
    return model, acc


# ---- distances between feature sets -----------------------------------------------------------------------

def _gaussian_fit(name: str, feats) -> tuple[np.ndarray, np.ndarray]:
    x = _features(name, feats, min_rows=2)
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def _sqrtm(a: np.ndarray) -> np.ndarray | None:
    """scipy's sqrtm, or None when the result is not finite or does not square back to ``a`` (rel. 1e-6)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # singular input: judged by the residual below
        r = linalg.sqrtm(a)
    if not np.isfinite(r).all():
        return None
    if np.abs(r @ r - a).max() > 1e-6 * max(np.abs(a).max(), 1e-300):
        return None
    return r


def frechet_distance(feat_a, feat_b) -> float:
    """Fréchet distance between Gaussian fits N(mu_a, S_a), N(mu_b, S_b) of two feature sets.

    Args:
        feat_a: (N_a, F) features, N_a >= 2.   feat_b: (N_b, F), N_b >= 2 (tensors or arrays).

    Returns:
        |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^{1/2}) >= 0, in float64; S = the unbiased sample
        covariance (N - 1 denominator). The matrix square root is ``scipy.linalg.sqrtm``; when it is not
        finite or does not square back to S_a S_b (near-singular covariances) it is retried with eps I,
        eps = 1e-6 max(tr S_a, tr S_b) / F, added to both covariances inside the root, and a negligible
        imaginary part (round-off) is dropped.
    """
    mu_a, s_a = _gaussian_fit("feat_a", feat_a)
    mu_b, s_b = _gaussian_fit("feat_b", feat_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feat_a and feat_b must have the same feature dimension: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    scale = max(np.trace(s_a), np.trace(s_b), 1e-300)
    covmean = _sqrtm(s_a @ s_b)
    if covmean is None:  # near-singular product (e.g. dead ReLU features): regularise, as pytorch-fid does
        off = (1e-6 * scale / s_a.shape[0]) * np.eye(s_a.shape[0])
        covmean = _sqrtm((s_a + off) @ (s_b + off))
        if covmean is None:
            raise ValueError("frechet_distance: sqrtm(S_a S_b) failed even with eps I added; features are degenerate")
    if np.iscomplexobj(covmean):
        # the exact root of a product of PSD matrices has real eigenvalues; large imaginary parts mean trouble
        if np.abs(covmean.imag).max() > 1e-3 * scale:
            raise ValueError(f"frechet_distance: sqrtm(S_a S_b) has a large imaginary part "
                             f"({np.abs(covmean.imag).max():.3g}); features are degenerate")
        covmean = covmean.real
    diff = mu_a - mu_b
    fd = float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)  # exact value is >= 0; only round-off can take it below


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(m(m-1)) - 2 sum_{i,j} k(x_i,y_j)/m^2."""
    m = x.shape[0]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2.0 * kxy.sum() / (m * m))


def kernel_inception_distance(feat_a, feat_b, *, n_subsets: int = 10, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """Kernel distance (KID of Binkowski et al. 2018) in the given feature space.

    For each of ``n_subsets`` subsets, m = min(subset_size, N_a, N_b) rows of each set are drawn without
    replacement (numpy ``default_rng(seed)``) and the unbiased MMD^2 with the cubic polynomial kernel
    k(x, y) = (x.y / F + 1)^3 is computed:
        sum_{i!=j} k(a_i,a_j)/(m(m-1)) + sum_{i!=j} k(b_i,b_j)/(m(m-1)) - 2 sum_{i,j} k(a_i,b_j)/m^2.

    Args:
        feat_a: (N_a, F), N_a >= 2.   feat_b: (N_b, F), N_b >= 2.

    Returns:
        (mean, std) over the subsets (std with the 1/n_subsets normalisation). Unbiased, so the mean can
        be slightly negative when both sets come from one law.
    """
    a = _features("feat_a", feat_a)
    b = _features("feat_b", feat_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feat_a and feat_b must have the same feature dimension: {a.shape[1]} vs {b.shape[1]}")
    n_subsets, subset_size = _positive_int("n_subsets", n_subsets), _positive_int("subset_size", subset_size)
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    rng = np.random.default_rng(seed)
    vals = np.array([_mmd2_unbiased(a[rng.choice(a.shape[0], m, replace=False)],
                                    b[rng.choice(b.shape[0], m, replace=False)]) for _ in range(n_subsets)])
    return float(vals.mean()), float(vals.std())


# ---- memorisation check -----------------------------------------------------------------------------------

def _flat(name: str, x, min_rows: int = 1) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor (N, ...), got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 2 or x.shape[0] < min_rows or x[0].numel() < 1:
        raise ValueError(f"{name} must have shape (N, ...) with N >= {min_rows}, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x.detach().reshape(x.shape[0], -1)


def _two_nearest(queries: Tensor, train: Tensor) -> tuple[Tensor, Tensor]:
    """Distances (float64, (Q,)) from each query to its nearest and second-nearest training row.

    Candidates are found with the fast matmul form of ``torch.cdist`` in row blocks (at most
    ``_CHUNK_ELEMENTS`` distances at once); the two chosen distances are then recomputed directly in
    float64, so an exact copy gets exactly 0.
    """
    step = max(1, _CHUNK_ELEMENTS // train.shape[0])
    center = train.mean(0)  # translation invariant; keeps |a|^2 + |b|^2 - 2ab accurate
    t_c = train - center
    d1, d2 = [], []
    for i in range(0, queries.shape[0], step):
        q = queries[i:i + step]
        idx = torch.cdist(q - center, t_c).topk(2, dim=1, largest=False).indices  # (q, 2)
        d = (q.double()[:, None, :] - train[idx].double()).norm(dim=2).sort(dim=1).values
        d1.append(d[:, 0])
        d2.append(d[:, 1])
    return torch.cat(d1), torch.cat(d2)


def nearest_neighbour_ratios(samples: Tensor, train: Tensor, heldout: Tensor) -> dict[str, float]:
    """Memorisation check in pixel space (images flattened to vectors).

    For each generated sample: d1 = distance to its nearest training image, d2 = to the second nearest.

    Args:
        samples: (N, ...) generated images.   train: (M, ...) training images, M >= 2.
        heldout: (K, ...) real images NOT in the training set (the reference distance).

    Returns:
        median_nn_sample  median d1 over the samples;
        median_nn_heldout median d1 of the held-out images against the training set (how far genuinely new
                          images are from the training set);
        nn_ratio          median_nn_sample / median_nn_heldout (well below 1 suggests copying);
        frac_copies       fraction of samples with d1 / d2 < 1/3 (one training image much closer than the rest).
    """
    s = _flat("samples", samples)
    t = _flat("train", train, min_rows=2)
    h = _flat("heldout", heldout)
    for name, x in (("samples", s), ("heldout", h)):
        if x.shape[1] != t.shape[1]:
            raise ValueError(f"{name} must have {t.shape[1]} values per image like train, got {x.shape[1]}")
    dtype = torch.promote_types(torch.promote_types(s.dtype, t.dtype), h.dtype)
    s, t, h = s.to(dtype), t.to(dtype).to(s.device), h.to(dtype).to(s.device)
    with torch.no_grad():
        d1_s, d2_s = _two_nearest(s, t)
        d1_h, _ = _two_nearest(h, t)
    med_s, med_h = float(d1_s.median()), float(d1_h.median())
    # d2 == 0 means two identical training images: d1 == 0 too, a copy
    ratio = torch.where(d2_s > 0, d1_s / d2_s.clamp_min(1e-300), torch.zeros_like(d1_s))
    return {
        "median_nn_sample": med_s,
        "median_nn_heldout": med_h,
        "nn_ratio": med_s / med_h if med_h > 0 else math.inf,
        "frac_copies": float((ratio < 1.0 / 3.0).double().mean()),
    }


# ---- everything at once -----------------------------------------------------------------------------------

@torch.no_grad()
def _classifier_features(classifier: nn.Module, x: Tensor) -> Tensor:
    p = next(iter(classifier.parameters()), None)
    dtype, device = (p.dtype, p.device) if p is not None else (x.dtype, x.device)
    out = [classifier.features(x[i:i + _FEATURE_BATCH].to(device=device, dtype=dtype)).double().cpu()
           for i in range(0, x.shape[0], _FEATURE_BATCH)]
    return torch.cat(out)


def image_metrics(samples: Tensor, reference: Tensor, classifier: FeatureClassifier, *, train: Tensor | None = None,
                  heldout: Tensor | None = None, seed: int = 0, kid_subset_size: int = 1000,
                  kid_subsets: int = 10) -> dict[str, float]:
    """FD and KID in ``classifier``'s feature space, plus the nearest-neighbour check when given the data.

    Args:
        samples: (N, C, H, W) generated images, N >= 2.   reference: (M, C, H, W) real images, M >= 2.
        classifier: anything with ``features(x) -> (n, F)`` (a :class:`FeatureClassifier`); run in eval mode
            under no_grad, in chunks, its train/eval mode restored afterwards.
        train, heldout: training and held-out real images for :func:`nearest_neighbour_ratios` (both or neither).
        seed: KID subsets.   kid_subset_size, kid_subsets: see :func:`kernel_inception_distance`.

    Returns:
        {"fd", "kid_mean", "kid_std"} and, with train/heldout, the keys of :func:`nearest_neighbour_ratios`.
    """
    samples = _images("samples", samples, min_rows=2)
    reference = _images("reference", reference, min_rows=2)
    if samples.shape[1:] != reference.shape[1:]:
        raise ValueError(f"samples and reference must have one image shape: "
                         f"{tuple(samples.shape[1:])} vs {tuple(reference.shape[1:])}")
    if not callable(getattr(classifier, "features", None)):
        raise TypeError(f"classifier must have a features(x) method, got {type(classifier).__name__}")
    if (train is None) != (heldout is None):
        raise ValueError("train and heldout must be given together (or both left out)")
    was_training = getattr(classifier, "training", False)
    if isinstance(classifier, nn.Module):
        classifier.eval()
    try:
        fa = _classifier_features(classifier, samples)
        fb = _classifier_features(classifier, reference)
    finally:
        if isinstance(classifier, nn.Module):
            classifier.train(was_training)
    kid_mean, kid_std = kernel_inception_distance(fa, fb, n_subsets=kid_subsets, subset_size=kid_subset_size,
                                                  seed=seed)
    out = {"fd": frechet_distance(fa, fb), "kid_mean": kid_mean, "kid_std": kid_std}
    if train is not None:
        out.update(nearest_neighbour_ratios(samples, train, heldout))
    return out


# ---- pictures ----------------------------------------------------------------------------------------------

def _grid_array(images: np.ndarray, nrow: int, pad: int = 1) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> (rows (H + pad) + pad, nrow (W + pad) + pad, C) with white padding."""
    n, c, h, w = images.shape
    ncol = nrow
    nrows = math.ceil(n / ncol)
    grid = np.ones((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c))
    for k in range(n):
        r, q = divmod(k, ncol)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = images[k].transpose(1, 2, 0)
    return grid


def save_image_grid(images, path, *, nrow: int | None = None, value_range: tuple[float, float] = (0, 1),
                    title: str | None = None) -> str:
    """Save images (N, C, H, W), C = 1 (grayscale) or 3 (RGB), as a PNG grid.

    Args:
        images: a tensor or array; values are mapped from ``value_range`` = (lo, hi) to [0, 1] and clipped.
        path: the PNG file (its folder must exist); written atomically (temporary file, then ``os.replace``).
        nrow: images per row (default ceil(sqrt(N))).   title: optional figure title.

    Returns:
        ``path`` as a string.
    """
    if isinstance(images, Tensor):
        images = images.detach().cpu().to(torch.float64).numpy()
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, C, H, W) with N >= 1 and C in (1, 3), got {images.shape}")
    lo, hi = (float(v) for v in value_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"value_range must be (lo, hi) with lo < hi, got {value_range!r}")
    n = images.shape[0]
    nrow = math.ceil(math.sqrt(n)) if nrow is None else _positive_int("nrow", nrow)
    nrow = min(nrow, n)
    imgs = np.nan_to_num(np.clip((images - lo) / (hi - lo), 0.0, 1.0), nan=0.0)
    grid = _grid_array(imgs, nrow)

    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    path = os.fspath(path)
    h_px, w_px = grid.shape[:2]
    scale = max(1.0, 256.0 / max(h_px, w_px))  # small grids are enlarged (nearest) to stay legible
    fig = Figure(figsize=(w_px * scale / 100, h_px * scale / 100 + (0.3 if title else 0)), dpi=100)
    ax = fig.add_axes((0, 0, 1, h_px * scale / 100 / fig.get_figheight()))
    ax.axis("off")
    if grid.shape[2] == 1:
        ax.imshow(grid[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=9, y=0.99)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
