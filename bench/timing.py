"""What the benchmarks share: the networks of the speed table, a whole training step, its timing, and
the per-layer attribution pass.

Whole steps are timed with one sync at the end of each step (the GPU's queue drained), never
per layer: a sync per layer costs more than a small layer on a GPU.  Where the time goes is
measured in a *separate* pass (``layer_times``) that syncs after every layer; its total is
larger than a step's, and only its shares are meant to be read.
"""
import contextlib
import os
import time
from collections import defaultdict

import numpy as np

from minicompact.backend import array_module, synchronize
from minicompact.layers.conv_choice import set_conv_algo
from minicompact.layers.workspace import share_columns
from minicompact.losses import softmax_cross_entropy
from minicompact.model import CompactNet, ModelConfig
from minicompact.objective import Penalty, train_step
from minicompact.optim import SGD
from minicompact.regularizers import variant

# The four networks of the speed table: depth, width multiplier, crop, stem, classes, batch.
NETWORKS = {
    "paper": dict(depth=12, width_mult=1.0, image_size=224, stem="imagenet", classes=1000, batch=64),
    "quarter": dict(depth=12, width_mult=0.25, image_size=64, stem="small", classes=1000, batch=64),
    "demo": dict(depth=12, width_mult=0.0625, image_size=32, stem="small", classes=10, batch=32),
    "depth8": dict(depth=8, width_mult=0.25, image_size=32, stem="small", classes=10, batch=128),
}
RHO, LR, MOMENTUM, CW, CTHETA = 0.03, 0.01, 0.9, 1e-4, 1e-4


def describe(net):
    """One line naming a network of ``NETWORKS`` (a dict of its fields)."""
    return (f"depth {net['depth']}, widths x{net['width_mult']:g}, {net['image_size']} px "
            f"({net['stem']} stem), {net['classes']} classes, batch {net['batch']}")


class Setup:
    """A CompactNet with its SGD, its CompactNet regularizer (ρ = 0.03) and one random batch.

    net: a dict of ``NETWORKS``; device: "cpu" or "gpu"; seed: of weights and data;
    dtype: of the model and the images (float64 for exact comparisons); conv_algo: of its
    3×3 stride-1 convolutions ("im2col", "winograd" or "auto", see ``layers.conv_choice``),
    "+shared" appended for one column workspace shared by all layers (``share_columns``).
    """

    def __init__(self, net, device, seed=0, dtype=np.float32, conv_algo="im2col"):
        xp = array_module(device)
        self.net, self.device = net, device
        cfg = ModelConfig(depth=net["depth"], num_classes=net["classes"],
                          width_mult=net["width_mult"], stem=net["stem"])
        algo, _, shared = conv_algo.partition("+")   # "im2col+shared": one column workspace
        self.model = set_conv_algo(CompactNet(cfg, seed=seed, dtype=dtype).to(device), algo)
        share_columns(self.model, shared == "shared")
        self.optimizer = SGD(self.model.param_layers, lr=LR, momentum=MOMENTUM)
        self.regularizer = Penalty(self.model, variant("compact", net["depth"], RHO), CW, CTHETA)
        rng = np.random.default_rng(seed)
        size = net["image_size"]
        self.x_host = rng.standard_normal((net["batch"], 3, size, size), dtype=np.float32).astype(dtype)
        self.y_host = rng.integers(0, net["classes"], net["batch"])
        self.x, self.y = xp.asarray(self.x_host), xp.asarray(self.y_host)

    def step(self):
        """One training step: forward, loss, backward, regularizer, SGD; no sync inside."""
        train_step(self.model, self.optimizer, self.x, self.y, self.regularizer,
                   softmax_cross_entropy, check_finite=False)


def timed(fn, sync):
    """Seconds that fn() takes, the device's queue drained before and after (``sync()``)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def layer_times(setup, steps=2):
    """Seconds per step spent in each kind of layer, with a sync after every layer.

    Returns a dict kind -> seconds (Conv2D, BatchNorm2D, ..., "loss", "regularizer + SGD"),
    averaged over ``steps`` steps after one unmeasured step.
    """
    model, opt, reg = setup.model, setup.optimizer, setup.regularizer
    per_kind = defaultdict(float)

    def run(kind, fn, arg):
        t0 = time.perf_counter()
        out = fn(arg)
        synchronize()
        per_kind[kind] += time.perf_counter() - t0
        return out

    for i in range(steps + 1):
        if i == 1:
            per_kind.clear()
        synchronize()
        h = setup.x
        for layer in model.layers:
            h = run(type(layer).__name__, layer.forward, h)
        _, d = run("loss", lambda s: softmax_cross_entropy(s, setup.y), h)
        for layer in reversed(model.layers):
            d = run(type(layer).__name__, layer.backward, d)

        def update(_):
            reg.add_gradient()   # what objective.objective adds after the backward
            opt.step()
            reg.after_step(opt.lr)
        run("regularizer + SGD", update, None)
    return {kind: t / steps for kind, t in per_kind.items()}


@contextlib.contextmanager
def kernels_switch(mode):
    """MINICOMPACT_KERNELS as ``mode`` ("on": the hand-written kernels, "off": their twins) for
    the code inside; ``CudaKernel`` reads it at every call, so a step run, captured or counted
    inside uses that setting."""
    saved = os.environ.get("MINICOMPACT_KERNELS")
    os.environ["MINICOMPACT_KERNELS"] = mode
    try:
        yield
    finally:
        if saved is None:
            del os.environ["MINICOMPACT_KERNELS"]
        else:
            os.environ["MINICOMPACT_KERNELS"] = saved
