"""The ReLU nonlinearity of every feature extraction layer (paper sec. 3.1)."""
import numpy as np

from ..backend import get_array_module
from .base import Layer


def relu(x):
    """max(0, x) elementwise, a new array of x's dtype (NaN stays NaN)."""
    return get_array_module(x).maximum(x, 0)  # a Python 0 keeps x's dtype


def relu_backward(dout, mask):
    """dout·mask, mask the boolean ``x > 0`` of forward: a new array (dout is left untouched).

    A product, not a select: where the mask is False the result is dout·0 (-0.0 for a negative
    dout, NaN for an infinite one), the same bits everywhere ReLU's backward is computed
    (this layer, and batch-norm's ReLU-fused kernels' twins).
    """
    return get_array_module(dout).multiply(dout, mask)


class ReLU(Layer):
    """out = max(0, x), elementwise; no parameters.

    Memory kept for backward: a boolean mask ``x > 0`` (one byte per element), not x.

    On a GPU in training mode ``CompactNet`` skips this layer after a batch norm: the
    batch norm's kernels apply ``relu`` and ``relu_backward`` themselves (layers/batchnorm.py).
    """

    def forward(self, x):
        """x: any shape (at least 1-D), floating → out: same shape and dtype."""
        if getattr(x, "ndim", 0) < 1:
            raise ValueError(f"ReLU expects an array with at least one dimension, got "
                             f"{type(x).__name__} of shape {getattr(x, 'shape', None)}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"ReLU expects a floating input, got dtype {x.dtype} (shape {tuple(x.shape)})")
        self.cache = x > 0
        return relu(x)

    def backward(self, dout):
        """dout: the output's shape → dx = dout·[x > 0], a new array (dout is left untouched)."""
        mask = self.cache
        if mask is None:
            raise RuntimeError("ReLU.backward called before forward")
        if dout.shape != mask.shape:
            raise ValueError(f"ReLU.backward expects dout of shape {tuple(mask.shape)}, got {tuple(dout.shape)}")
        return relu_backward(dout, mask)
