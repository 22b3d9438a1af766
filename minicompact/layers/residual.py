"""ResNet's basic block (He et al. 2016, fig. 2 left): two 3×3 convolutions and a shortcut.

    x ─ conv1 3×3/s ─ bn1 ─ relu ─ conv2 3×3 ─ bn2 ─┐
    │                                                + ─ relu ─ out
    └────────── identity, or conv 1×1/s ─ bn ───────┘

The shortcut is the identity when the block keeps the width and the size, else a 1×1
convolution with the block's stride and a batch norm (the "projection shortcut", option B of
He et al.).  The addition is the only new piece of maths: ``residual_add_forward`` and
``residual_add_backward``.  Its backward sends the same gradient down both branches, which
is why a deep ResNet trains: the identity path carries dL/dout to x undiminished.
"""
import numpy as np

from .activations import ReLU
from .batchnorm import BatchNorm2D
from .conv import Conv2D


def residual_add_forward(main, shortcut):
    """out = main + shortcut, elementwise.

    main, shortcut: (N, C, H, W), one dtype.  Returns (out, cache): out a new array of their
    shape and dtype; cache None (an addition needs nothing for its backward).
    """
    if main.shape != shortcut.shape:
        raise ValueError(f"a residual addition needs two arrays of one shape, got the main branch "
                         f"{tuple(main.shape)} and the shortcut {tuple(shortcut.shape)}")
    return main + shortcut, None


def residual_add_backward(dout, cache=None):
    """d(main + shortcut) = dout for each: returns (dmain, dshortcut), both dout itself.

    dout: (N, C, H, W), not modified (the callers below never write into either result).
    """
    return dout, dout


class BasicBlock:
    """conv 3×3 → BN → ReLU → conv 3×3 → BN, plus the shortcut, then ReLU (module docstring).

    in_channels, out_channels: C_in, C_out; stride: of the first conv and of the projection;
    dtype, rng: of the initial weights (``Conv2D``, He-initialised; BN γ = 1, β = 0);
    mid_channels: conv1's filters (default C_out; a thinned block's may be fewer);
    projection: whether the shortcut is a projection (``shortcut_conv``, ``shortcut_bn``);
    default: when stride != 1 or C_in != C_out.  Without one both are None and the
    shortcut is x itself, which needs stride 1 and C_in = C_out.

    Not a ``Layer``: a block holds layers and owns no array; ``layers`` lists them, and a
    network puts them in its own flat ``layers`` (modes, devices, optimizer, checkpoints).
    ``params`` and ``grads`` are flat views named ``"conv1.W"``, ``"bn1.gamma"``, ...
    (the arrays themselves, not copies), which ``gradcheck.check_layer`` perturbs in place.
    """

    def __init__(self, in_channels, out_channels, stride=1, dtype=np.float32, rng=None,
                 mid_channels=None, projection=None):
        rng = np.random.default_rng() if rng is None else rng
        mid = out_channels if mid_channels is None else mid_channels
        if projection is None:
            projection = stride != 1 or in_channels != out_channels
        elif not projection and (stride != 1 or in_channels != out_channels):
            raise ValueError(f"an identity shortcut needs stride 1 and C_in = C_out, got stride {stride}, "
                             f"{in_channels} -> {out_channels}")
        self.conv1 = Conv2D(in_channels, mid, 3, stride=stride, padding=1, dtype=dtype, rng=rng)
        self.bn1 = BatchNorm2D(mid, dtype=dtype)
        self.relu1 = ReLU()
        self.conv2 = Conv2D(mid, out_channels, 3, stride=1, padding=1, dtype=dtype, rng=rng)
        self.bn2 = BatchNorm2D(out_channels, dtype=dtype)
        self.shortcut_conv = self.shortcut_bn = None
        if projection:
            self.shortcut_conv = Conv2D(in_channels, out_channels, 1, stride=stride, padding=0,
                                        dtype=dtype, rng=rng)
            self.shortcut_bn = BatchNorm2D(out_channels, dtype=dtype)
        self.relu2 = ReLU()

    def forward(self, x):
        """x: (N, C_in, H, W) → (N, C_out, H/stride, W/stride), x's dtype."""
        h = self.relu1.forward(self.bn1.forward(self.conv1.forward(x)))
        h = self.bn2.forward(self.conv2.forward(h))
        s = x if self.shortcut_conv is None else self.shortcut_bn.forward(self.shortcut_conv.forward(x))
        out, _ = residual_add_forward(h, s)
        return self.relu2.forward(out)

    def backward(self, dout):
        """dout: the output's shape → dx (N, C_in, H, W): the main branch's gradient plus the
        shortcut's; fills the grads of every conv and batch norm.  The shortcut goes first, so
        the layers run backward in the reverse of ``named_layers`` (sync batch-norm's
        collectives need that one order on every rank, ``SyncBatchNorm2D``)."""
        d = self.relu2.backward(dout)
        dmain, dshort = residual_add_backward(d)
        if self.shortcut_conv is not None:
            dshort = self.shortcut_conv.backward(self.shortcut_bn.backward(dshort))
        dmain = self.conv2.backward(self.bn2.backward(dmain))
        dmain = self.conv1.backward(self.bn1.backward(self.relu1.backward(dmain)))
        return dmain + dshort

    def named_layers(self):
        """(name, layer) of every layer, in data order: conv1, bn1, relu1, conv2, bn2,
        [shortcut.conv, shortcut.bn,] relu2."""
        yield from (("conv1", self.conv1), ("bn1", self.bn1), ("relu1", self.relu1),
                    ("conv2", self.conv2), ("bn2", self.bn2))
        if self.shortcut_conv is not None:
            yield from (("shortcut.conv", self.shortcut_conv), ("shortcut.bn", self.shortcut_bn))
        yield "relu2", self.relu2

    @property
    def layers(self):
        return [layer for _, layer in self.named_layers()]

    @property
    def params(self):
        return {f"{n}.{k}": v for n, layer in self.named_layers() for k, v in layer.params.items()}

    @property
    def grads(self):
        return {f"{n}.{k}": v for n, layer in self.named_layers() for k, v in layer.grads.items()}

    def __repr__(self):
        c = self.conv1
        return (f"BasicBlock({c.in_channels}, {self.conv2.out_channels}, stride={c.stride}"
                + (f", mid_channels={c.out_channels}" if c.out_channels != self.conv2.out_channels else "")
                + (", projection" if self.shortcut_conv is not None else "") + ")")
