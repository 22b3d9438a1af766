"""SGD with momentum and the step learning-rate schedule of the paper (sec. 5.1).

The paper solves Eq. (1) with SGD, momentum 0.9, batches of 256, learning rate 0.1 divided
by 10 every 30 epochs, for 90 epochs.  The optimizer only updates parameters from their
gradients: the regularizer's (sub)gradient is already in them (``objective.objective``, the
one place eq. 1 is put together), and its proximal step runs after the update
(``objective.train_step``).
"""
import numpy as np

from .backend import device_of, get_array_module, is_gpu_array, to_cpu, to_device
from .cuda import CudaKernel
from .cuda import sgd
from .system.npz import check_array


def momentum_twin(p, g, v, lr, lr_scale, momentum, nesterov, p_out=None, v_out=None):
    """``SGD.step``'s update of one parameter as array expressions (the kernel's twin).

    p, g: the parameter and its gradient; v: its momentum buffer (None without momentum);
    lr: 0-d float64 array on the device; lr_scale: the layer's lr_mult; p_out, v_out: where
    to write (None: new arrays; p and v: in place).  Returns (p_out, v_out).
    The very expressions of ``SGD.step`` on the CPU, with lr·lr_scale rounded to p's dtype
    as a Python float is (tests/test_cuda_sgd_graph.py holds the two bit-identical).
    """
    xp = get_array_module(p)
    step = (lr * lr_scale).astype(p.dtype)
    if momentum == 0:
        return xp.subtract(p, step * g, out=p_out), v_out
    v_out = xp.multiply(v, momentum, out=v_out)       # v ← μ·v
    v_out += g                                        #   + g
    d = g + momentum * v_out if nesterov else v_out
    return xp.subtract(p, step * d, out=p_out), v_out


# One launch per parameter on a GPU (cuda/sgd.py), checked against momentum_twin.
SGD_MOMENTUM = CudaKernel("sgd-momentum", sgd.SOURCE, ["sgd_momentum"], sgd.launch_momentum, momentum_twin,
                          sgd.sample_momentum)


class SGD:
    """Stochastic gradient descent with (Nesterov) momentum, PyTorch's convention::

        v ← momentum · v + g          (v starts at 0, so the first v equals g)
        p ← p - lr · v                (plain momentum)
        p ← p - lr · (g + momentum · v)   (nesterov=True, with the updated v)

    layers: a list of objects with ``params`` and ``grads`` dicts (``Layer`` instances);
    parameters are looked up by key at every step, so a layer may replace its arrays (move
    them to another device, cast them) between steps.  Updates happen in place, in each
    parameter's dtype, on its device.

    lr_mult: one factor per layer (default 1 each): that layer's parameters step with
    ``lr_mult[i] · lr`` in the formulas above, nothing else changes (fine-tuning trains a new
    classifier at a larger rate than the transferred layers, paper sec. 5.3.3).

    On a GPU each parameter's update is one fused kernel (``SGD_MOMENTUM``: the same formulas,
    the same bits) that reads the rate from a 0-d device array (``lr_array``), written when
    ``lr`` is set: a step captured as a CUDA graph then uses each replay's rate, never the
    number it was captured with (``training/graph_step.py``).
    """

    def __init__(self, layers, lr=0.1, momentum=0.9, nesterov=False, lr_mult=None):
        if lr < 0 or momentum < 0:
            raise ValueError(f"SGD needs lr >= 0 and momentum >= 0, got lr={lr}, momentum={momentum}")
        if nesterov and momentum == 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self.layers = list(layers)
        self.lr_mult = [1.0] * len(self.layers) if lr_mult is None else [float(m) for m in lr_mult]
        if len(self.lr_mult) != len(self.layers) or min(self.lr_mult, default=0.0) < 0:
            raise ValueError(f"lr_mult needs one factor >= 0 per layer ({len(self.layers)}), got {lr_mult}")
        self._lr_array = None  # lr on the parameters' device (GPU only; see lr_array)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.velocity = {}  # "<layer index>.<param name>" -> array like the parameter

    @property
    def lr(self):
        """The learning rate of the next step (a float)."""
        return self._lr

    @lr.setter
    def lr(self, value):
        value = float(value)
        if self._lr_array is not None and value != self._lr:
            self._lr_array.fill(value)  # a tiny kernel, queued before the step: no sync
        self._lr = value

    def lr_array(self, xp):
        """``lr`` as a 0-d float64 array on ``xp``'s device: what the GPU kernels read.

        Made at the first GPU step and rewritten whenever ``lr`` changes, always outside the
        step itself, so a captured step reads each replay's rate from it."""
        if self._lr_array is None or get_array_module(self._lr_array) is not xp:
            self._lr_array = xp.full((), self._lr, dtype=np.float64)
        return self._lr_array

    def step_lr(self):
        """The rate of the step just taken, for ``Penalty.after_step``: the device array of
        ``lr_array`` once a GPU step has made it, else the float."""
        return self._lr if self._lr_array is None else self._lr_array

    def parameters(self):
        """Yield ``(key, layer, name, param, grad)`` for every parameter, looked up now.

        key: ``"<layer index>.<param name>"``; grad is None when backward has not filled it.
        """
        for i, layer in enumerate(self.layers):
            for name, p in layer.params.items():
                yield f"{i}.{name}", layer, name, p, layer.grads.get(name)

    def zero_grad(self):
        """Set every gradient to zeros (``Layer.zero_grad`` of each layer)."""
        for layer in self.layers:
            layer.zero_grad()

    def step(self):
        """Update every parameter in place from its gradient, with ``self.lr``."""
        base, mu = float(self.lr), self.momentum  # Python floats never promote float32 arrays
        for key, _, name, p, g in self.parameters():
            mult = self.lr_mult[int(key.split(".", 1)[0])]
            lr = base * mult
            if g is None or g.shape != p.shape:
                raise ValueError(f"parameter {key} of shape {tuple(p.shape)} has gradient of shape "
                                 f"{None if g is None else tuple(g.shape)}; run backward first")
            if is_gpu_array(p):  # the formulas below as one kernel, lr·mult read on the device
                v = self._buffer(key, p) if mu else None
                SGD_MOMENTUM(p, g, v, self.lr_array(get_array_module(p)), mult, mu, self.nesterov, p, v)
                continue
            if mu == 0:
                p -= lr * g
                continue
            v = self._buffer(key, p)
            v *= mu
            v += g
            if self.nesterov:
                p -= lr * (g + mu * v)
            else:
                p -= lr * v

    def buffers(self):
        """Every parameter's momentum buffer, in parameter order, made now (zeros) where a
        first step has not made it yet; [] without momentum.  What a step updates in place
        besides the parameters (``training/graph_step.py`` saves and restores them)."""
        if self.momentum == 0:
            return []
        return [self._buffer(key, p) for key, _, _, p, _ in self.parameters()]

    def _buffer(self, key, p):
        """The momentum buffer of parameter ``key``, zeros at first, on p's device and dtype."""
        v = self.velocity.get(key)
        if v is None:
            v = get_array_module(p).zeros_like(p)
        elif v.shape != p.shape:
            raise ValueError(f"momentum buffer {key} has shape {tuple(v.shape)}, parameter has "
                             f"{tuple(p.shape)}")
        elif device_of(v) != device_of(p) or v.dtype != p.dtype:
            v = to_device(v, device_of(p)).astype(p.dtype, copy=False)
        self.velocity[key] = v
        return v

    def state_dict(self):
        """The momentum buffers as NumPy arrays keyed ``"<layer index>.<param name>"``.

        The learning rate is not saved: it is a pure function of the position in training
        (``StepLR.lr_at``), so resuming at the same step gives bit-identical updates.
        """
        return {k: to_cpu(v).copy() for k, v in self.velocity.items()}

    def load_state_dict(self, state):
        """Restore buffers saved by ``state_dict``; each moves to its parameter's device/dtype.

        Every buffer is checked before any is kept: ValueError (one line) for a key naming no
        parameter, or a buffer that is not a finite floating-point array of its parameter's
        shape (``checkpoint.check_array``, which names it ``opt.<key>`` as the file does).
        """
        params = {key: p for key, _, _, p, _ in self.parameters()}
        for key, v in state.items():
            if key not in params:
                raise ValueError(f"optimizer state has a buffer {key!r} for no parameter; "
                                 f"parameters are {sorted(params)}")
            check_array(f"opt.{key}", v, params[key].shape)
        velocity = {}
        for key, v in state.items():
            p = params[key]
            velocity[key] = to_device(np.asarray(v).astype(p.dtype), device_of(p))
        self.velocity = velocity
        return self


class StepLR:
    """Learning rate divided by ``1/gamma`` every ``step_size`` epochs, with optional warmup.

    lr = base_lr · gamma ** (epoch // step_size)   (paper: 0.1, ×0.1 every 30 epochs)

    With ``warmup_epochs`` = w > 0 (may be fractional) the rate grows linearly, step by step,
    over the first W = w · steps_per_epoch steps: at global step s (counting from 0) it is
    multiplied by min(1, (s + 1) / W), so the first step uses lr/W, never 0.

    Small-data presets need warmup: with lr 0.1, no warmup and He initialisation, the
    12-layer demo network on 32-px images is still at chance after one epoch (the
    classifier reads all 21·K pyramid features at once and its first updates blow the logits
    up), while 0.01 with one or two warmup epochs learns.

    ``lr_at`` is a pure function of its arguments, so a resumed run gets the same rates.
    """

    def __init__(self, base_lr=0.1, step_size=30, gamma=0.1, warmup_epochs=0.0):
        if base_lr <= 0 or step_size < 1 or gamma <= 0 or warmup_epochs < 0:
            raise ValueError(f"StepLR needs base_lr > 0, step_size >= 1, gamma > 0, warmup_epochs >= 0;"
                             f" got {base_lr}, {step_size}, {gamma}, {warmup_epochs}")
        self.base_lr = float(base_lr)
        self.step_size = int(step_size)
        self.gamma = float(gamma)
        self.warmup_epochs = float(warmup_epochs)

    def lr_at(self, epoch, step_in_epoch=0, steps_per_epoch=1):
        """The learning rate of step ``step_in_epoch`` (0-based) of epoch ``epoch`` (0-based)."""
        if epoch < 0 or steps_per_epoch < 1 or not 0 <= step_in_epoch < steps_per_epoch:
            raise ValueError(f"lr_at needs epoch >= 0 and 0 <= step_in_epoch < steps_per_epoch, got "
                             f"epoch={epoch}, step_in_epoch={step_in_epoch}, steps_per_epoch={steps_per_epoch}")
        lr = self.base_lr * self.gamma ** (int(epoch) // self.step_size)
        warmup_steps = self.warmup_epochs * steps_per_epoch
        step = int(epoch) * steps_per_epoch + int(step_in_epoch)
        if step + 1 < warmup_steps:
            lr *= (step + 1) / warmup_steps
        return lr

    def __repr__(self):
        return (f"StepLR(base_lr={self.base_lr}, step_size={self.step_size}, gamma={self.gamma}, "
                f"warmup_epochs={self.warmup_epochs})")
