"""The learning problem of eq. 1, wired to a model, and one SGD step on it:

    argmin_{W,Θ}  C_W Ω(W) + C_Θ Σ_l Γ_l(Θ^l) + (1/N) Σ_i L(x_i, y_i; W, Θ)        (1)

There is exactly one place where the regularizer's gradient joins the data gradient:
``objective`` runs the model's forward and backward for the data term and then calls
``Penalty.add_gradient`` once.  ``train_step`` is ``objective`` followed by the SGD
update and, for ``update="proximal"``, the group soft-thresholding after it.  The optimizer
itself knows nothing about regularizers, so the term cannot be counted twice.  In
data-parallel training the data gradients are all-reduced between the backward and the
regularizer (``reduce_gradients``), so the term is added once, after the reduce, on every
rank alike (``distributed/data_parallel.py`` says why).

Batch-norm parameters and the classifier bias are not regularized (the paper regularizes only
Θ^l and W).

Values (the objective, the data loss, the regularizer) are 0-d arrays on the model's device,
not Python floats: on a GPU, turning one into a Python number waits for the GPU to finish
(a sync), so a training loop sums them on the device and reads them once per log interval.
"""
import math

import numpy as np

from .backend import get_array_module, is_gpu_array
from .cuda import CudaKernel
from .cuda import sgd
from . import losses
from .regularizers import group_norms, mixed_term, proximal_step, regularization, regularized_groups
from .group_scale import scale_groups

# The losses by name: functions of losses.py, looked up at each call, so that a loss replaced
# there (by a notebook experimenting, or a test) is the one used.
LOSSES = {"cross_entropy": "softmax_cross_entropy", "hinge": "multiclass_hinge_loss"}
UPDATES = ("subgradient", "proximal")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite (``train_step`` raises it before updating anything;
    ``training.trainer.Trainer`` when it reads its running sums, before any checkpoint is written)."""


def check_weights(cw, ctheta):
    """The weights C_W and C_Θ of eq. 1 are >= 0 (ValueError otherwise)."""
    if cw < 0 or ctheta < 0:
        raise ValueError(f"C_W and C_Θ must be >= 0, got {cw} and {ctheta}")


def group_gradient_twin(x, grad, total, c, mix, group_axes, subgradient, grad_out=None):
    """``regularizers.regularization``'s work on one regularized array (the kernel's twin):
    what ``Penalty.add_gradient`` does per array on a GPU.

    x: W or a Θ^l; grad: its data gradient; total: the regularizer's value so far (0-d, or
    None for the first term); c: C_W or C_Θ^l; mix: α or β^l; group_axes: of Ω, Γ or Ψ;
    subgradient: whether the group part joins the gradient (False: proximal mode).
    Returns (grad + c·∂term, total + c·term), the first written to grad_out (None: new).
    """
    xp = get_array_module(x)
    value, d = mixed_term(x, mix, group_axes, subgradient)
    d *= c
    term = c * value
    return xp.add(grad, d, out=grad_out), (term if total is None else total + term)


def group_shrink_twin(x, lr, one_minus_momentum, c, mix, group_axes, out=None):
    """``regularizers.group_soft_threshold`` with τ = lr/(1−μ)·c·mix read on the device (the
    kernel's twin): ``Penalty.after_step``'s proximal step of one array.

    x: W or a Θ^l; lr: 0-d float64 array; one_minus_momentum: 1 − μ; c, mix, group_axes: as
    ``group_gradient_twin``; out: where to write (x: in place; None: a new array).
    The same expressions as ``group_soft_threshold`` (τ rounded to x's dtype as a Python float
    is), plus a guard that leaves a zero group alone when τ is 0 (lr 0) instead of 0/0.
    """
    xp = get_array_module(x)
    tau = (lr / one_minus_momentum * c * mix).astype(x.dtype)
    denominator = xp.maximum(group_norms(x, group_axes), tau)
    scale = 1.0 - tau / xp.where(denominator > 0, denominator, 1)
    return xp.multiply(x, scale.astype(x.dtype, copy=False), out=out)


# One warp per group on a GPU (cuda/sgd.py), each checked against its twin above.
GROUP_GRADIENT = CudaKernel("group-gradient", sgd.SOURCE, ["group_gradient", "group_value"],
                            sgd.launch_group_gradient, group_gradient_twin, sgd.sample_group_gradient)
GROUP_SHRINK = CudaKernel("group-shrink", sgd.SOURCE, ["group_shrink"], sgd.launch_group_shrink,
                          group_shrink_twin, sgd.sample_group_shrink)


class Penalty:
    """The regularization part of eq. 1, C_W Ω(W) + C_Θ Σ_l Γ_l(Θ^l) (or Ψ_l), for one model.

    model: a ``CompactNet``; config: a ``regularizers.RegConfig`` (which variant, α, β_l);
    cw, ctheta: C_W and C_Θ of eq. 1 (paper: 1e-4); update: "subgradient" (the paper's
    scheme, default: the whole (sub)gradient joins the data gradient) or "proximal" (only the
    smooth ℓ2 part does; the group part is applied as a proximal step after the update,
    which produces exact zeros during training).
    momentum: the optimizer's momentum μ.  With momentum the smooth part moves by about
    lr/(1-μ)·∇ per step, so the proximal step thresholds with τ = lr·C·β/(1-μ): its fixed
    points are then eq. 1's with this same C, as in subgradient mode (``group_scale.py``).
    0 (the default) thresholds with lr·C·β.
    group_scale: (k_W, k_Θ), the factors on the group-lasso parts of Ω and of Γ_l/Ψ_l, the ℓ2
    parts keeping C_W, C_Θ (``group_scale.scale_groups``; None or (1, 1): eq. 1 as written).
    """

    def __init__(self, model, config, cw=1e-4, ctheta=1e-4, update="subgradient", momentum=0.0,
                 group_scale=None):
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        check_weights(cw, ctheta)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.model, self.config = model, config
        self.momentum = float(momentum)
        self.cw, self.ctheta, self.update = cw, ctheta, update
        # What the arithmetic uses: eq. 1's terms rewritten with the group parts scaled.
        if group_scale is not None and (isinstance(group_scale, (int, float)) or len(group_scale) != 2):
            raise ValueError(f"group_scale must be a pair (k_W, k_Θ) or None, got {group_scale!r}")
        kw, ktheta = group_scale or (1.0, 1.0)
        self._config, self._cw, self._ctheta = scale_groups(config, cw, ctheta, kw, ktheta)
        self.last_value = 0.0

    def add_gradient(self):
        """Add C_W·∂Ω to W's gradient and C_Θ·∂Γ_l to each Θ^l's; return the term's value
        (0-d, on the model's device; also kept in ``last_value``).

        Called by ``objective`` right after the model's backward has set the data gradients.
        On a GPU each regularized array takes one fused kernel (``GROUP_GRADIENT``) instead of
        ``regularization``'s twenty-odd array expressions: the same terms, in the same order.
        """
        m = self.model
        if is_gpu_array(m.classifier.params["W"]):
            value = None
            grads = [m.classifier.grads] + [conv.grads for conv in m.convs]
            for (x, c, mix, axes), grad in zip(self._terms(), grads):
                _, value = GROUP_GRADIENT(x, grad["W"], value, c, mix, axes, self.update == "subgradient",
                                          grad["W"])
            self.last_value = value
            return value
        value, dW, dthetas = regularization(
            self._config, m.classifier.params["W"], m.thetas(), self._cw, self._ctheta,
            group_subgradient=(self.update == "subgradient"))
        m.classifier.grads["W"] += dW
        for conv, d in zip(m.convs, dthetas):
            conv.grads["W"] += d
        self.last_value = value
        return value

    def _terms(self):
        """``regularizers.regularized_groups`` of this model: (array, C, mix, group axes) each."""
        m = self.model
        return regularized_groups(self._config, m.classifier.params["W"], m.thetas(), self._cw, self._ctheta)

    def after_step(self, lr):
        """After an SGD step with learning rate ``lr``: the proximal step (proximal mode only),
        with step lr/(1-μ) (see the class docstring).

        lr: a float, or on a GPU the optimizer's 0-d device copy (``SGD.step_lr``), which a
        step captured as a CUDA graph must read rather than a number fixed at capture."""
        if self.update != "proximal":
            return
        m = self.model
        W = m.classifier.params["W"]
        if is_gpu_array(W):  # one kernel per array, τ computed on the device
            xp = get_array_module(W)
            if isinstance(lr, (int, float)):
                lr = xp.full((), float(lr), dtype=np.float64)
            for x, c, mix, axes in self._terms():
                if c * mix != 0:  # τ = 0 leaves the array as it is (group_soft_threshold)
                    GROUP_SHRINK(x, lr, 1.0 - self.momentum, c, mix, axes, x)
            return
        proximal_step(self._config, W, m.thetas(), float(lr) / (1.0 - self.momentum), self._cw, self._ctheta)


def loss_function(loss):
    """A loss name ("cross_entropy", "hinge") or a ``losses`` function → the function."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    return getattr(losses, LOSSES[loss])


def objective(model, x, labels, regularizer=None, loss="cross_entropy", reduce_gradients=None):
    """Value of eq. 1 on one batch; sets every parameter gradient of ``model`` to its gradient.

    x: (N, C, H, W) images; labels: (N,) integer classes (host labels are range-checked,
    device labels are not: see ``losses.check_labels``); regularizer: a ``Penalty`` (None:
    the data term alone); loss: "cross_entropy", "hinge" or a function of ``losses``.
    reduce_gradients: None (one process), or data-parallel training's all-reduce
    (``distributed.GradientAllReduce``), run between the backward and the regularizer so that
    the data term is the mean over the global batch and the regularizer is added once, after
    it, on every rank alike; x and labels are then None on a rank without readable images.
    Returns (objective, data_loss, scores): the two values 0-d arrays on the device (nothing
    is read back to the host), scores (N, Y) (None without images).
    """
    if x is None:
        if reduce_gradients is None:
            raise ValueError("objective got no images (x is None); only a data-parallel rank "
                             "with no readable image may do that, with reduce_gradients")
        scores, data_loss = None, reduce_gradients.without_data()
    else:
        scores = model.forward(x)
        data_loss, dscores = loss_function(loss)(scores, labels)
        model.backward(dscores)  # sets (does not accumulate) every gradient
        if reduce_gradients is not None:
            data_loss = reduce_gradients(data_loss, labels.shape[0])
    if regularizer is None:
        return data_loss, data_loss, scores
    return data_loss + regularizer.add_gradient(), data_loss, scores


def train_step(model, optimizer, x, labels, regularizer=None, loss="cross_entropy", lr=None,
               check_finite=True, reduce_gradients=None):
    """One SGD step on eq. 1: ``objective``, the update, then ``Penalty.after_step``.

    lr: the learning rate of this step (None keeps ``optimizer.lr``).
    check_finite: raise ``NonFiniteLoss`` before updating anything when the data loss is NaN
    or infinite.  That reads the loss on the host: on a GPU, one sync per step.  ``Trainer``
    passes False and checks the sums it reads once per log interval instead.
    reduce_gradients: see ``objective``.
    Returns (objective, data_loss, scores) as ``objective`` does.
    """
    value, data_loss, scores = objective(model, x, labels, regularizer, loss, reduce_gradients)
    if check_finite and not math.isfinite(float(data_loss)):
        raise NonFiniteLoss(f"the loss became {float(data_loss)}")
    if lr is not None:
        optimizer.lr = lr
    optimizer.step()
    if regularizer is not None:
        regularizer.after_step(optimizer.step_lr())
    return value, data_loss, scores
