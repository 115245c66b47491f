"""Image data for the score-model training driver.

    from steinops.data import load_image_data
    data = load_image_data("mnist", root="../shared/data/mnist", scale="pm1", pad_to=32)
    data.train            # (N, 1, 32, 32) float32 in [-1, 1]
    data.to_unit(x)       # back to [0, 1] for plots and metrics

``idx`` reads and writes the IDX files MNIST ships in; ``images`` holds the loaders (sklearn digits,
MNIST), the ``ImageData`` bundle and a flip augmentation.
"""
from .idx import read_idx, write_idx
from .images import IMAGE_DATASETS, ImageData, load_digits, load_image_data, load_mnist, random_flip

__all__ = ["IMAGE_DATASETS", "ImageData", "load_digits", "load_image_data", "load_mnist", "random_flip",
           "read_idx", "write_idx"]
