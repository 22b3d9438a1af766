"""Where a ``Conv2D``'s im2col columns live: its own buffer (the default) or one shared by all.

Each im2col layer keeps its column matrix from forward to backward, C·kh·kw·N·Ho·Wo elements
(kh·kw/stride² times its input), and reuses that buffer in the next forward.
``share_columns(model)`` instead gives every conv one ``ColumnWorkspace``: a layer then keeps
only its input and rebuilds its columns in backward, in the shared buffer (conv.py's
``shared_columns`` algorithm).  Which algorithm runs is ``conv_choice.py``'s.
"""
from ..backend import device_of, get_array_module


class ColumnWorkspace:
    """One column buffer shared by the im2col convolutions of a network (``share_columns``).

    A layer using it keeps only its input for backward (1× the input instead of the kh·kw·×
    of its columns) and rebuilds the columns in backward, in this same buffer: the network's
    column memory is that of its largest layer instead of the sum over layers, for one extra
    im2col copy per layer and step.  The input must not change between forward and backward
    (no layer of a CompactNet writes into its input).
    """

    def __init__(self):
        self.buffer = None

    def get(self, shape, dtype, like):
        """A contiguous view of ``shape`` and ``dtype`` on ``like``'s device (the buffer grows
        to the largest request; its old contents are not kept)."""
        size = 1
        for s in shape:
            size *= int(s)
        b = self.buffer
        if b is None or b.size < size or b.dtype != dtype or device_of(b) != device_of(like):
            self.buffer = b = get_array_module(like).empty(size, dtype=dtype)
        return b[:size].reshape(shape)


def share_columns(model, on=True):
    """Give every conv of ``model`` one shared ``ColumnWorkspace`` (``on=False``: each layer
    keeps its own columns again, the default).  Affects the im2col path only.  Returns model."""
    workspace = ColumnWorkspace() if on else None
    for conv in model.convs:
        conv.columns = workspace
        conv.cache = None
    return model
