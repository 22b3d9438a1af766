"""The layers of a CompactNet (paper sec. 3.1 and 3.2), each a forward and a hand-written backward.

Feature extraction layer: Conv2D → BatchNorm2D → ReLU → MaxPool2D.
Classification layer: SpatialPyramidPool → SoftmaxClassifier.
"""
from .activations import ReLU
from .base import Layer, check_input
from .batchnorm import BatchNorm2D
from .classifier import SoftmaxClassifier
from .conv import Conv2D
from .pooling import MaxPool2D, SpatialPyramidPool

__all__ = ["Layer", "check_input", "Conv2D", "BatchNorm2D", "ReLU", "MaxPool2D",
           "SpatialPyramidPool", "SoftmaxClassifier"]
