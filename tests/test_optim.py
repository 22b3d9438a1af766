"""SGD and StepLR: hand-computed momentum steps, hook order, exact resume, schedule values."""
import numpy as np
import pytest

from minicompact.backend import to_cpu
from minicompact.layers.base import Layer
from minicompact.optim import SGD, StepLR


class Params(Layer):
    """A parameter holder standing in for a real layer."""

    def __init__(self, **arrays):
        super().__init__()
        self.params = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
        self.zero_grad()


def set_grads(layer, xp, **grads):
    for k, g in grads.items():
        layer.grads[k] = xp.asarray(np.asarray(g, dtype=np.float32))


def test_two_hand_computed_momentum_steps(xp, device):
    layer = Params(w=[1.0, -2.0]).to(device)
    opt = SGD([layer], lr=0.5, momentum=0.9)
    set_grads(layer, xp, w=[1.0, 2.0])
    opt.step()   # v = g = [1, 2];  p = [1, -2] - 0.5·[1, 2] = [0.5, -3]
    np.testing.assert_allclose(to_cpu(layer.params["w"]), [0.5, -3.0], rtol=1e-6)
    set_grads(layer, xp, w=[-1.0, 0.0])
    opt.step()   # v = 0.9·[1, 2] + [-1, 0] = [-0.1, 1.8];  p = [0.55, -3.9]
    np.testing.assert_allclose(to_cpu(layer.params["w"]), [0.55, -3.9], rtol=1e-6)
    assert layer.params["w"].dtype == np.float32
    np.testing.assert_allclose(opt.state_dict()["0.w"], [-0.1, 1.8], rtol=1e-6)


def test_nesterov_and_plain_sgd(xp, device):
    layer = Params(w=[1.0]).to(device)
    opt = SGD([layer], lr=0.1, momentum=0.9, nesterov=True)
    for g in (2.0, 1.0):
        set_grads(layer, xp, w=[g])
        opt.step()
    # step 1: v = 2, p = 1 - 0.1·(2 + 1.8) = 0.62; step 2: v = 2.8, p = 0.62 - 0.1·(1 + 2.52)
    np.testing.assert_allclose(to_cpu(layer.params["w"]), [0.62 - 0.352], rtol=1e-6)
    layer = Params(w=[1.0]).to(device)
    opt = SGD([layer], lr=0.1, momentum=0.0)
    set_grads(layer, xp, w=[2.0])
    opt.step()
    np.testing.assert_allclose(to_cpu(layer.params["w"]), [0.8], rtol=1e-6)
    assert opt.state_dict() == {}


def test_update_is_in_place_and_arrays_are_looked_up_each_step(xp, device):
    layer = Params(w=[1.0, 1.0]).to(device)
    opt = SGD([layer], lr=1.0, momentum=0.0)
    w = layer.params["w"]
    set_grads(layer, xp, w=[1.0, 1.0])
    opt.step()
    assert layer.params["w"] is w                     # updated in place
    layer.params["w"] = xp.asarray(np.array([5.0, 5.0], np.float32))  # the layer swaps its array
    opt.step()
    np.testing.assert_allclose(to_cpu(layer.params["w"]), [4.0, 4.0])


def test_state_dict_round_trip_gives_identical_updates(xp, device):
    rng = np.random.default_rng(0)
    shapes = {"W": (3, 4, 2), "b": (3,)}

    def fresh():
        return [Params(**{k: np.zeros(s) for k, s in shapes.items()}).to(device), Params().to(device)]

    grads = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(6)]
    layers_a = fresh()
    opt_a = SGD(layers_a, lr=0.1, momentum=0.9)
    for g in grads[:3]:
        set_grads(layers_a[0], xp, **g)
        opt_a.step()
    state = opt_a.state_dict()
    assert set(state) == {"0.W", "0.b"} and all(type(v) is np.ndarray for v in state.values())

    layers_b = fresh()
    for k in shapes:
        layers_b[0].params[k] = layers_a[0].params[k].copy()
    opt_b = SGD(layers_b, lr=0.1, momentum=0.9).load_state_dict(state)
    for g in grads[3:]:
        for layer, opt in ((layers_a[0], opt_a), (layers_b[0], opt_b)):
            set_grads(layer, xp, **g)
            opt.step()
    for k in shapes:
        assert np.array_equal(to_cpu(layers_a[0].params[k]), to_cpu(layers_b[0].params[k]))

    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        opt_b.load_state_dict({"0.b": np.zeros(4)})
    with pytest.raises(ValueError, match="'1.W'"):
        opt_b.load_state_dict({"1.W": np.zeros(3)})


def test_missing_gradient_is_reported():
    layer = Params(w=[1.0])
    layer.grads = {}
    with pytest.raises(ValueError, match="0.w"):
        SGD([layer]).step()


def test_step_lr_values():
    sched = StepLR(0.1, step_size=30, gamma=0.1)
    for epoch, want in ((0, 0.1), (29, 0.1), (30, 0.01), (59, 0.01), (60, 0.001), (89, 0.001)):
        assert sched.lr_at(epoch, 5, 10) == pytest.approx(want, rel=1e-12)


def test_step_lr_warmup_is_linear_per_step_and_pure():
    sched = StepLR(0.1, step_size=30, gamma=0.1, warmup_epochs=0.5)
    lrs = [sched.lr_at(0, s, 10) for s in range(10)]  # W = 5 warmup steps
    np.testing.assert_allclose(lrs, [0.02, 0.04, 0.06, 0.08] + [0.1] * 6, rtol=1e-12)
    assert sched.lr_at(0, 3, 10) == lrs[3]           # a pure function: resume is exact
    sched = StepLR(0.2, warmup_epochs=2.5)
    assert sched.lr_at(0, 0, 4) == pytest.approx(0.02)        # 1/10 of the way
    assert sched.lr_at(1, 3, 4) == pytest.approx(0.2 * 8 / 10)
    assert sched.lr_at(2, 1, 4) == pytest.approx(0.2)         # step 9: the last warmup step
    assert sched.lr_at(40, 0, 4) == pytest.approx(0.02)       # decay unaffected by warmup
    with pytest.raises(ValueError, match="step_in_epoch"):
        sched.lr_at(0, 4, 4)


def test_lr_mult_scales_one_layers_rate_and_keeps_the_momentum_formula(xp, device):
    a, b = Params(w=[1.0]).to(device), Params(w=[1.0]).to(device)
    opt = SGD([a, b], lr=0.5, momentum=0.9, lr_mult=[1.0, 10.0])
    for g in (1.0, -1.0):
        set_grads(a, xp, w=[g])
        set_grads(b, xp, w=[g])
        opt.step()
    # v: 1, then 0.9 - 1 = -0.1; a: 1 - 0.5·1 - 0.5·(-0.1) = 0.55; b with lr 5: 1 - 5 + 0.5 = -3.5
    np.testing.assert_allclose(to_cpu(a.params["w"]), [0.55], rtol=1e-6)
    np.testing.assert_allclose(to_cpu(b.params["w"]), [-3.5], rtol=1e-6)
    np.testing.assert_allclose(opt.state_dict()["1.w"], [-0.1], rtol=1e-6)  # the buffer is the same v
    with pytest.raises(ValueError, match="one factor >= 0 per layer"):
        SGD([a, b], lr_mult=[1.0])
