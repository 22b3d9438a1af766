"""The learning problem of eq. 1, wired to a model:

    argmin_{W,Θ}  C_W Ω(W) + C_Θ Σ_l Γ_l(Θ^l) + (1/N) Σ_i L(x_i, y_i; W, Θ)        (1)

The data term comes from the model's forward/backward and a loss; the regularization term
from ``minicompact.regularizers``.  ``Regularizer`` adds the regularizer's subgradient to the
gradients *just before* each optimizer step (an optimizer hook, as Chainer's ``Lasso``), or,
with ``update="proximal"``, keeps only the smooth ℓ2 part there and applies group
soft-thresholding *after* the step, which produces exact zeros during training.

Batch-norm parameters and the classifier bias are not regularized (the paper regularizes only
Θ^l and W).
"""
from .losses import multiclass_hinge_loss, softmax_cross_entropy
from .regularizers import proximal_step, regularization

LOSSES = {"cross_entropy": softmax_cross_entropy, "hinge": multiclass_hinge_loss}
UPDATES = ("subgradient", "proximal")


class Regularizer:
    """C_W Ω(W) + C_Θ Σ_l Γ_l(Θ^l) (or Ψ_l) for one model, as optimizer hooks.

    model: a ``CompactNet``; config: a ``regularizers.RegConfig`` (which variant, α, β_l);
    cw, ctheta: C_W and C_Θ of eq. 1 (paper: 1e-4); update: "subgradient" (paper, default)
    or "proximal".
    """

    def __init__(self, model, config, cw=1e-4, ctheta=1e-4, update="subgradient"):
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
        if cw < 0 or ctheta < 0:
            raise ValueError(f"C_W and C_Θ must be >= 0, got {cw} and {ctheta}")
        self.model, self.config = model, config
        self.cw, self.ctheta, self.update = cw, ctheta, update
        self.last_value = 0.0

    def add_subgradients(self, optimizer=None):
        """Add the regularizer's (sub)gradient to W's and each Θ^l's gradient; return its value."""
        m = self.model
        value, dW, dthetas = regularization(
            self.config, m.classifier.params["W"], m.thetas(), self.cw, self.ctheta,
            group_subgradient=(self.update == "subgradient"))
        m.classifier.grads["W"] += dW
        for conv, d in zip(m.convs, dthetas):
            conv.grads["W"] += d
        self.last_value = value
        return value

    def proximal(self, optimizer):
        """After a step: group soft-thresholding with step size lr·C (proximal mode only)."""
        if self.update == "proximal":
            m = self.model
            proximal_step(self.config, m.classifier.params["W"], m.thetas(), optimizer.lr,
                          self.cw, self.ctheta)

    def attach(self, optimizer):
        """Register as the optimizer's pre-update hook (and post-update hook for proximal)."""
        optimizer.hooks.append(self.add_subgradients)
        optimizer.post_hooks.append(self.proximal)
        return self


def objective(model, x, labels, regularizer=None, loss="cross_entropy"):
    """Value of eq. 1 on one batch; fills every parameter gradient of ``model``.

    x: (N, C, H, W) images; labels: (N,) integer classes. Returns (objective, data_loss,
    scores) with scores (N, Y). With ``regularizer`` None this is the data term alone.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    scores = model.forward(x)
    data_loss, dscores = LOSSES[loss](scores, labels)
    model.backward(dscores)
    reg = regularizer.add_subgradients() if regularizer is not None else 0.0
    return data_loss + reg, data_loss, scores
