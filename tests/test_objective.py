"""Eq. 1 has one path: ``objective`` adds the regularizer's gradient once, ``train_step`` updates.

The reference update is computed independently: the data gradient from the model's own
backward, the regularizer's from ``regularizers.regularization``, and the SGD rule written out.
Counting C_W Ω and C_Θ Γ twice (as an optimizer hook plus ``objective`` once did) would move
every regularized weight by an extra lr·C·∂Γ and fail these tests.
"""
import numpy as np
import pytest

from minicompact.backend import to_cpu, to_device
from minicompact.model import CompactNet, ModelConfig
from minicompact.objective import NonFiniteLoss, Penalty, objective, train_step
from minicompact.optim import SGD
from minicompact.regularizers import proximal_step, regularization, variant


def tiny(device="cpu", dtype=np.float64):
    model = CompactNet(ModelConfig(depth=3, num_classes=3, width_mult=1 / 64, stem="small"),
                       seed=3, dtype=dtype).to(device)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 3, 8, 8)).astype(dtype)
    y = np.array([0, 1, 2, 1])
    return model, x, y


def data_gradients(model, x, y):
    """The data term's gradients alone, from a forward and backward without any regularizer."""
    objective(model, x, y, regularizer=None)
    return {(n, k): g.copy() for n, layer in model.named_layers() for k, g in layer.grads.items()}


@pytest.mark.parametrize("update", ["subgradient", "proximal"])
def test_train_step_adds_the_regularizer_exactly_once(update):
    lr, cw, ctheta = 0.1, 0.3, 0.2   # large C's: a double count would move weights by ~1e-2
    model, x, y = tiny()
    config = variant("compact", 3, 0.5)
    grads = data_gradients(model, x, y)
    before = {(n, k): p.copy() for n, layer in model.named_layers() for k, p in layer.params.items()}
    thetas = [before[(f"conv{l}", "W")] for l in (1, 2)]
    _, dW, dthetas = regularization(config, before[("classifier", "W")], thetas, cw, ctheta,
                                    group_subgradient=(update == "subgradient"))
    grads[("classifier", "W")] = grads[("classifier", "W")] + dW
    for l, d in zip((1, 2), dthetas):
        grads[(f"conv{l}", "W")] = grads[(f"conv{l}", "W")] + d
    want = {key: before[key] - lr * grads[key] for key in before}   # momentum 0: p -= lr·g
    if update == "proximal":
        proximal_step(config, want[("classifier", "W")], [want[("conv1", "W")], want[("conv2", "W")]],
                      lr, cw, ctheta)

    reg = Penalty(model, config, cw=cw, ctheta=ctheta, update=update)
    train_step(model, SGD(model.param_layers, lr=lr, momentum=0.0), x, y, reg)
    for n, layer in model.named_layers():
        for k, p in layer.params.items():
            np.testing.assert_allclose(p, want[(n, k)], rtol=1e-12, atol=1e-14, err_msg=f"{n}.{k}")


def test_objective_value_is_data_loss_plus_the_regularizer():
    model, x, y = tiny()
    config = variant("compressed", 3, 0.5)
    reg = Penalty(model, config, cw=0.3, ctheta=0.2)
    value, data_loss, scores = objective(model, x, y, reg)
    reg_value, _, _ = regularization(config, model.classifier.params["W"], model.thetas(), 0.3, 0.2)
    assert value == pytest.approx(data_loss + reg_value, rel=1e-12)
    assert reg_value > 0.01 * data_loss and scores.shape == (4, 3)


def test_calling_objective_twice_gives_the_same_gradients():
    """Backward sets gradients and the regularizer adds to them once per call: no build-up."""
    model, x, y = tiny()
    reg = Penalty(model, variant("compact", 3, 0.5), cw=0.3, ctheta=0.2)
    objective(model, x, y, reg)
    first = {(n, k): g.copy() for n, layer in model.named_layers() for k, g in layer.grads.items()}
    objective(model, x, y, reg)
    for n, layer in model.named_layers():
        for k, g in layer.grads.items():
            np.testing.assert_array_equal(g, first[(n, k)], err_msg=f"{n}.{k}")


def test_non_finite_loss_raises_before_any_update(device):
    model, x, y = tiny(device, np.float32)
    x[0, 0, 0, 0] = np.nan
    before = to_cpu(model.classifier.params["W"]).copy()
    opt = SGD(model.param_layers, lr=0.1, momentum=0.9)
    with pytest.raises(NonFiniteLoss, match="nan"):
        train_step(model, opt, to_device(x, device), y, Penalty(model, variant("compact", 3, 0.5)))
    np.testing.assert_array_equal(to_cpu(model.classifier.params["W"]), before)
    assert opt.velocity == {}



def test_no_images_without_a_data_parallel_reduce_is_a_clear_error():
    model, _, _ = tiny()
    with pytest.raises(ValueError, match="no images"):
        objective(model, None, None)
