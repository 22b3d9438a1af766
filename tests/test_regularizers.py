"""Ω, Γ, Ψ (eqs. 2, 6, 7), their proximal operators and the three model variants."""
import dataclasses
import math

import numpy as np
import pytest

from minicompact import regularizers as R
from minicompact.backend import get_array_module, to_cpu, to_device
from minicompact.gradcheck import assert_gradients_close, numerical_gradient

MIXES = [0.0, 0.01, 0.3, 0.7, 1.0]


# --------------------------------------------------------------------------- references
def omega_loops(W, alpha):
    """Eq. (2) written out: explicit sums over every entry and every group W[y,k,:]."""
    W = to_cpu(W).astype(np.float64)
    frob = sum(float(v) ** 2 for v in W.ravel())
    groups = sum(math.sqrt(sum(float(v) ** 2 for v in W[y, k]))
                 for y in range(W.shape[0]) for k in range(W.shape[1]))
    return (1 - alpha) * 0.5 * frob + alpha * groups


def gamma_loops(theta, beta):
    """Eq. (6) written out: groups Θ[k,t,:,:]."""
    t = to_cpu(theta).astype(np.float64)
    frob = sum(float(v) ** 2 for v in t.ravel())
    groups = sum(math.sqrt(sum(float(v) ** 2 for v in t[k, c].ravel()))
                 for k in range(t.shape[0]) for c in range(t.shape[1]))
    return (1 - beta) * 0.5 * frob + beta * groups


def psi_loops(theta, beta):
    """Eq. (7) written out: groups Θ[k,:,:,:]."""
    t = to_cpu(theta).astype(np.float64)
    frob = sum(float(v) ** 2 for v in t.ravel())
    groups = sum(math.sqrt(sum(float(v) ** 2 for v in t[k].ravel())) for k in range(t.shape[0]))
    return (1 - beta) * 0.5 * frob + beta * groups


def groups_with_norms(rng, shape, group_axes, low=0.5, high=2.0):
    """Random float64 array whose every group has a norm drawn uniformly from [low, high]."""
    x = rng.standard_normal(shape)
    norms = np.sqrt((x * x).sum(axis=group_axes, keepdims=True))
    target = rng.uniform(low, high, size=norms.shape)
    return x * (target / norms)


def smooth_point(rng, shape):
    """Entries of size 0.3..1 with random signs: every group norm and every gradient entry
    is far from 0, so central differences are accurate to ~1e-9 relative."""
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.3, 1.0, size=shape)


CASES = [  # regularizer, reference, prox, shape, group axes
    (R.omega, omega_loops, R.prox_omega, (3, 4, 5), (2,)),
    (R.gamma, gamma_loops, R.prox_gamma, (4, 3, 3, 3), (2, 3)),
    (R.psi, psi_loops, R.prox_psi, (4, 3, 3, 3), (1, 2, 3)),
]
IDS = ["omega", "gamma", "psi"]


# --------------------------------------------------------------------------- values
@pytest.mark.parametrize("reg, ref, prox, shape, axes", CASES, ids=IDS)
@pytest.mark.parametrize("mix", MIXES)
def test_value_matches_equation(xp, rng, reg, ref, prox, shape, axes, mix):
    x = rng.standard_normal(shape)
    x[0, 1] = 0.0                           # one zero group (a whole filter for Ψ)
    value, grad = reg(xp.asarray(x), mix)
    assert value.shape == () and get_array_module(value) is xp   # stays on the device
    value = float(value)
    assert value == pytest.approx(ref(x, mix), rel=1e-12)
    # group_subgradient=False changes the gradient, never the value
    assert float(reg(xp.asarray(x), mix, group_subgradient=False)[0]) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("reg, ref, prox, shape, axes", CASES, ids=IDS)
def test_float32_stays_float32_on_its_device(xp, rng, reg, ref, prox, shape, axes):
    x = xp.asarray(rng.standard_normal(shape).astype(np.float32))
    value, grad = reg(x, 0.4)
    assert grad.dtype == np.float32 and grad.shape == x.shape
    assert get_array_module(grad) is xp
    assert value.dtype == np.float32 and get_array_module(value) is xp
    assert float(value) == pytest.approx(ref(to_cpu(x), 0.4), rel=1e-5)
    for g in (reg(x, 0.4, group_subgradient=False)[1], reg(x, 0.0)[1]):
        assert g.dtype == np.float32
    y = prox(x.copy(), 0.4, 0.5)
    assert y.dtype == np.float32 and get_array_module(y) is xp


def test_group_helpers(xp, rng):
    x = rng.standard_normal((2, 3, 4))
    x[1, 2] = 0.0
    norms = to_cpu(R.group_norms(xp.asarray(x), (2,)))
    assert norms.shape == (2, 3, 1)
    np.testing.assert_allclose(norms[..., 0], np.linalg.norm(x, axis=2), rtol=1e-14)
    value, sub = R.group_lasso(xp.asarray(x), (2,))
    assert float(value) == pytest.approx(np.linalg.norm(x, axis=2).sum(), rel=1e-13)
    sub = to_cpu(sub)
    assert np.all(sub[1, 2] == 0.0)          # exactly zero at the zero group, no NaN
    np.testing.assert_allclose(sub[0, 0], x[0, 0] / np.linalg.norm(x[0, 0]), rtol=1e-14)
    np.testing.assert_allclose(np.linalg.norm(sub[0], axis=1), 1.0, rtol=1e-14)


# --------------------------------------------------------------------------- subgradients
@pytest.mark.parametrize("reg, ref, prox, shape, axes", CASES, ids=IDS)
@pytest.mark.parametrize("mix", [0.3, 1.0])
def test_subgradient_is_zero_at_a_zero_group(xp, rng, reg, ref, prox, shape, axes, mix):
    x = rng.standard_normal(shape)
    x[1, 2] = 0.0                           # for Ψ this is only part of filter 1 ...
    if reg is R.psi:
        x[1] = 0.0                          # ... so zero the whole filter
    with np.errstate(all="raise"):          # no 0/0 on the way
        _, grad = reg(xp.asarray(x), mix)
    grad = to_cpu(grad)
    assert np.all(np.isfinite(grad))
    assert np.all(grad[1, 2] == 0.0)
    if reg is R.psi:
        assert np.all(grad[1] == 0.0)


@pytest.mark.parametrize("reg, ref, prox, shape, axes", CASES, ids=IDS)
@pytest.mark.parametrize("mix", MIXES)
def test_subgradient_gradcheck(device, reg, ref, prox, shape, axes, mix):
    """Away from zero groups the regularizer is smooth: its gradient must match."""
    rng = np.random.default_rng([IDS.index(reg.__name__), int(1000 * mix)])
    x = to_device(smooth_point(rng, shape), device)
    upstream = rng.standard_normal()         # a random upstream gradient of the scalar
    _, grad = reg(x, mix)
    numeric = numerical_gradient(lambda: upstream * reg(x, mix)[0], x)
    assert_gradients_close(f"{reg.__name__}(mix={mix})", upstream * grad, numeric, tol=1e-7)


@pytest.mark.parametrize("reg, ref, prox, shape, axes", CASES, ids=IDS)
def test_group_lasso_gradcheck_alone(rng, reg, ref, prox, shape, axes):
    x = smooth_point(rng, shape)
    upstream = rng.standard_normal()
    _, sub = R.group_lasso(x, axes)
    numeric = numerical_gradient(lambda: upstream * R.group_lasso(x, axes)[0], x)
    assert_gradients_close("group_lasso", upstream * sub, numeric, tol=1e-7)


@pytest.mark.parametrize("reg, ref, prox, shape, axes", CASES, ids=IDS)
def test_without_group_subgradient_only_l2_part(xp, rng, reg, ref, prox, shape, axes):
    x = rng.standard_normal(shape)
    _, grad = reg(xp.asarray(x), 0.3, group_subgradient=False)
    np.testing.assert_allclose(to_cpu(grad), 0.7 * x, rtol=1e-15)
    # and the full gradient is that plus α times the group-lasso subgradient
    _, full = reg(xp.asarray(x), 0.3)
    _, sub = R.group_lasso(x, axes)
    np.testing.assert_allclose(to_cpu(full), 0.7 * x + 0.3 * sub, rtol=1e-13)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"\(Y, K, R\).*\(2, 3, 4, 5\)"):
        R.omega(np.zeros((2, 3, 4, 5)), 0.1)
    with pytest.raises(ValueError, match=r"\(K, T, kh, kw\).*\(2, 3\)"):
        R.gamma(np.zeros((2, 3)), 0.1)
    with pytest.raises(ValueError, match=r"\(K, T, kh, kw\)"):
        R.prox_psi(np.zeros((2, 3, 4)), 0.1, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        R.omega(np.zeros((2, 3, 4)), 1.5)
    with pytest.raises(ValueError, match="beta"):
        R.psi(np.zeros((2, 3, 3, 3)), -0.1)
    with pytest.raises(ValueError, match="tau"):
        R.group_soft_threshold(np.zeros((2, 3)), -1.0, (1,))


# --------------------------------------------------------------------------- proximal operators
def test_soft_threshold_zeroes_small_groups_and_shrinks_the_rest(xp):
    tau = 0.25
    x = np.zeros((6, 3))
    x[0] = [0.1, 0.0, 0.0]                  # norm < τ
    x[1] = [tau, 0.0, 0.0]                  # norm == τ exactly
    x[2] = [0.1, -0.15, 0.05]               # norm < τ
    x[3] = [0.3, -0.4, 0.0]                 # norm 0.5
    x[4] = [1.0, 2.0, -2.0]                 # norm 3
    # row 5 stays zero
    out = to_cpu(R.group_soft_threshold(xp.asarray(x), tau, (1,)))
    assert np.all(out[[0, 1, 2, 5]] == 0.0)
    for i, norm in ((3, 0.5), (4, 3.0)):
        assert np.linalg.norm(out[i]) == pytest.approx(norm - tau, rel=1e-14)
        np.testing.assert_allclose(out[i], x[i] * (1 - tau / norm), rtol=1e-14)


def test_soft_threshold_in_place_or_new(xp, rng):
    x = xp.asarray(rng.standard_normal((3, 4, 5)))
    keep = x.copy()
    y = R.group_soft_threshold(x, 0.5, (2,))
    assert y is not x and bool((x == keep).all())
    z = R.group_soft_threshold(x, 0.5, (2,), out=x)
    assert z is x and bool((x == y).all())
    w = xp.asarray(rng.standard_normal((3, 4, 5)))
    assert R.prox_omega(w, 0.5, 0.0) is w    # τ = 0: a no-op


@pytest.mark.parametrize("reg, ref, prox, shape, axes", CASES, ids=IDS)
def test_prox_is_the_argmin(rng, reg, ref, prox, shape, axes):
    """z = prox(x) minimises ½‖z-x‖² + τΣ‖z_g‖: check optimality and compare with neighbours."""
    mix, step = 0.5, 2.0
    tau = mix * step
    x = groups_with_norms(rng, shape, axes, low=0.1, high=2 * tau)  # some groups below τ
    z = prox(x.copy(), mix, step)
    zn = np.sqrt((z * z).sum(axis=axes, keepdims=True))
    xn = np.sqrt((x * x).sum(axis=axes, keepdims=True))
    dead = (zn == 0).ravel()
    assert dead.any() and not dead.all()
    # optimality: 0 ∈ z - x + τ ∂Σ‖z_g‖
    np.testing.assert_array_less(xn.ravel()[dead], tau + 1e-12)       # zero groups: ‖x_g‖ ≤ τ
    alive = np.broadcast_to(zn > 0, z.shape)
    residual = z - x + tau * z / np.where(zn > 0, zn, 1)
    np.testing.assert_allclose(residual[alive], 0.0, atol=1e-12)

    def objective(v):
        return 0.5 * ((v - x) ** 2).sum() + tau * np.sqrt((v * v).sum(axis=axes)).sum()

    best = objective(z)
    for scale in (1e-3, 1e-1):
        for _ in range(20):
            assert objective(z + scale * rng.standard_normal(shape)) > best


@pytest.mark.parametrize("reg, ref, prox, shape, axes", CASES, ids=IDS)
def test_prox_uses_tau_step_times_mix(rng, reg, ref, prox, shape, axes):
    x = rng.standard_normal(shape)
    got = prox(x.copy(), 0.2, 3.0)
    np.testing.assert_array_equal(got, R.group_soft_threshold(x, 3.0 * 0.2, axes))
    assert not np.array_equal(got, R.group_soft_threshold(x, 0.2, axes))


# --------------------------------------------------------------------------- schedules and variants
@pytest.mark.parametrize("depth", [2, 3, 7, 12, 18])
def test_beta_schedule(depth):
    rho = 0.01
    betas = R.beta_schedule(depth, rho)
    assert isinstance(betas, list) and len(betas) == depth - 1
    assert all(isinstance(b, float) for b in betas)
    assert betas[0] == 0.0
    if depth == 2:
        assert betas == [0.0]               # the only dictionary acts on pixels
    else:
        assert betas[-1] == pytest.approx(rho, rel=1e-15)
        np.testing.assert_allclose(np.diff(betas), rho / (depth - 2), rtol=1e-12)
    assert R.beta_schedule(7, 0.5) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])


def test_variants():
    s = R.variant("simple", 5, 0.3)
    assert s == R.RegConfig("simple", 0.0, (0.0,) * 4, "gamma")
    c = R.variant("compressed", 5, 0.3)
    assert c == R.RegConfig("compressed", 0.0, (0.1,) * 4, "psi")
    assert R.variant("compressed", 3, 0.3, compressed_beta=0.2).betas == (0.2, 0.2)
    k = R.variant("compact", 5, 0.3)
    assert k.name == "compact" and k.alpha == 0.3 and k.conv_term == "gamma"
    assert k.betas == tuple(R.beta_schedule(5, 0.3)) and k.depth == 5
    assert R.variant("compact", 2, 0.3).betas == (0.0,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        k.alpha = 0.5
    for bad in [("dense", 5, 0.1), ("compact", 1, 0.1), ("compact", 2.5, 0.1),
                ("compact", 5, -0.1), ("compact", 5, 1.5), ("simple", 5, 2.0)]:
        with pytest.raises(ValueError):
            R.variant(*bad)
    with pytest.raises(ValueError):
        R.variant("compressed", 5, 0.1, compressed_beta=1.1)


# --------------------------------------------------------------------------- eq. (1)
def _network(rng, xp):
    W = xp.asarray(rng.standard_normal((5, 6, 4)))
    thetas = [xp.asarray(rng.standard_normal(s)) for s in [(4, 3, 3, 3), (6, 4, 3, 3)]]
    return W, thetas


@pytest.mark.parametrize("name", R.VARIANTS)
@pytest.mark.parametrize("group_subgradient", [True, False])
def test_regularization_is_the_sum_of_its_parts(xp, rng, name, group_subgradient):
    cfg = R.variant(name, 3, 0.4)
    W, thetas = _network(rng, xp)
    cw, ct = 2e-3, 5e-4
    value, dW, dthetas = R.regularization(cfg, W, thetas, cw, ct, group_subgradient)
    term = R.psi if cfg.conv_term == "psi" else R.gamma
    vw, gw = R.omega(W, cfg.alpha, group_subgradient)
    parts = [term(t, b, group_subgradient) for t, b in zip(thetas, cfg.betas)]
    assert float(value) == pytest.approx(cw * float(vw) + ct * sum(float(v) for v, _ in parts), rel=1e-13)
    np.testing.assert_allclose(to_cpu(dW), cw * to_cpu(gw), rtol=1e-14)
    assert len(dthetas) == 2
    for d, (_, g) in zip(dthetas, parts):
        np.testing.assert_allclose(to_cpu(d), ct * to_cpu(g), rtol=1e-14)
    # and against the equations written out
    ref = psi_loops if cfg.conv_term == "psi" else gamma_loops
    expect = cw * omega_loops(W, cfg.alpha) + ct * sum(ref(t, b) for t, b in
                                                       zip(thetas, cfg.betas))
    assert float(value) == pytest.approx(expect, rel=1e-12)
    with pytest.raises(ValueError, match="feature layers"):
        R.regularization(cfg, W, thetas[:1])


@pytest.mark.parametrize("name", ["compressed", "compact"])
def test_proximal_step(xp, rng, name):
    cfg = R.variant(name, 3, 0.4)
    W, thetas = _network(rng, xp)
    W0, t0 = W.copy(), [t.copy() for t in thetas]
    lr, cw, ct = 1.0, 5.0, 3.0                # large enough to zero some groups
    assert R.proximal_step(cfg, W, thetas, lr, cw, ct) is None
    np.testing.assert_array_equal(
        to_cpu(W), to_cpu(R.group_soft_threshold(W0, lr * cw * cfg.alpha, R.OMEGA_AXES)))
    axes = R.PSI_AXES if cfg.conv_term == "psi" else R.GAMMA_AXES
    for t, old, beta in zip(thetas, t0, cfg.betas):
        np.testing.assert_array_equal(
            to_cpu(t), to_cpu(R.group_soft_threshold(old, lr * ct * beta, axes)))
    if name == "compact":                     # β^1 = 0 leaves the first layer alone
        np.testing.assert_array_equal(to_cpu(thetas[0]), to_cpu(t0[0]))
        assert bool((W == 0).any())
