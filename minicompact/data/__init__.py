"""Data: ImageNet-style folders, robust image decoding, crops (sec. 5.1), batch loading, caching.

folders → images → transforms → loader (+ cache); ``synthetic`` draws the embedded demo dataset.
"""
from .folders import DatasetError, ImageFolder, open_dataset
from .images import BadImageError, load_rgb
from .loader import BatchLoader
from .transforms import center_crop, estimate_mean_std, normalize, scaled_sizes, ten_crop

__all__ = ["DatasetError", "ImageFolder", "open_dataset", "BadImageError", "load_rgb", "BatchLoader",
           "center_crop", "estimate_mean_std", "normalize", "scaled_sizes", "ten_crop"]
