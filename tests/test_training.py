"""Short trainings on a small in-memory problem: the loss falls, and group sparsity appears.

The images are drawn by the demo dataset's generator (minicompact.data.synthetic), so the
task needs local, translation-invariant features; everything stays in memory (no files).
"""
import numpy as np
import pytest

from minicompact.data.synthetic import draw_image
from minicompact.metrics import sparsity_report, threshold_
from minicompact.model import CompactNet, ModelConfig
from minicompact.objective import Penalty, train_step
from minicompact.optim import SGD, StepLR
from minicompact.regularizers import group_norms, variant

CLASSES = ("disc", "hstripes", "vstripes", "cross")


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(CLASSES)), 24)
    images = np.stack([draw_image(CLASSES[c], rng, size=16) for c in labels]).astype(np.float32)
    x = (images.transpose(0, 3, 1, 2) / 255.0 - 0.5) / 0.25
    return x.astype(np.float32), labels


def train(problem, name, rho, update, steps=60, cw=1e-4, ctheta=1e-4, lr=0.02):
    """A few epochs of minibatch SGD with eq. 1's regularizer; returns (model, losses per epoch)."""
    x, y = problem
    model = CompactNet(ModelConfig(depth=4, num_classes=len(CLASSES), width_mult=1 / 16, stem="small"), seed=0)
    opt = SGD(model.param_layers, lr=lr, momentum=0.9)
    reg = Penalty(model, variant(name, 4, rho), cw=cw, ctheta=ctheta, update=update)
    schedule = StepLR(lr, step_size=1000, warmup_epochs=1)
    rng = np.random.default_rng(1)
    batch, losses, per_epoch = 16, [], len(y) // 16
    for step in range(steps):
        if step % per_epoch == 0:
            order = rng.permutation(len(y))
            losses.append(0.0)
        idx = order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
        lr_now = schedule.lr_at(step // per_epoch, step % per_epoch, per_epoch)
        _, data_loss, _ = train_step(model, opt, x[idx], y[idx], reg, lr=lr_now)
        losses[-1] += data_loss / per_epoch
    return model, losses


def test_loss_falls_and_training_accuracy_rises(problem):
    model, losses = train(problem, "compact", 0.03, "subgradient", steps=120, lr=0.02)
    assert losses[-1] < 0.75 * losses[0], losses
    x, y = problem
    assert (model.predict(x).argmax(axis=1) == y).mean() > 0.8


def zero_groups(model):
    thetas = model.thetas()
    W = model.classifier.params["W"]
    return (sum(int((group_norms(t, (2, 3)) == 0).sum()) for t in thetas)
            + int((group_norms(W, (2,)) == 0).sum()))


def test_compactnet_with_large_rho_ends_with_many_more_zero_groups(problem):
    """Proximal updates give exact zeros during training; SimpleNet's ℓ2 gives none."""
    strong = dict(cw=1.0, ctheta=1.0, update="proximal", steps=48)
    simple, _ = train(problem, "simple", 0.0, **strong)
    compact, _ = train(problem, "compact", 0.9, **strong)
    z_simple, z_compact = zero_groups(simple), zero_groups(compact)
    assert z_simple == 0
    assert z_compact >= 50, z_compact
    report = sparsity_report(compact.thetas(), compact.classifier.params["W"], compact.classifier.params["b"].size)
    assert report["layers"]["classifier"]["average_compactness"] > 0.2
    assert report["effective_parameters"]["nonzero"] < simple.parameter_count()


def test_subgradient_training_shrinks_groups_and_threshold_zeroes_them(problem):
    """The paper's scheme: subgradients shrink groups towards zero; the threshold then zeroes them."""
    kw = dict(cw=1.0, ctheta=1.0, update="subgradient", steps=48)
    simple, _ = train(problem, "simple", 0.0, **kw)
    compact, _ = train(problem, "compact", 0.9, **kw)
    W_s, W_c = simple.classifier.params["W"], compact.classifier.params["W"]
    small = lambda W: int((group_norms(W, (2,)) < 0.02).sum())  # noqa: E731
    assert small(W_c) > small(W_s) + 10
    zeroed = threshold_(compact.thetas() + [W_c], 1e-2)
    assert zeroed > 0
