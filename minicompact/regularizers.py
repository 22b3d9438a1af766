"""The group-sparse regularizers of CompactNets: Ω (eq. 2), Γ (eq. 6) and Ψ (eq. 7).

Each mixes weight decay with a group lasso (a sum of Euclidean norms of groups of weights):

* Ω(W)  = (1-α)·½‖W‖²_F + α Σ_{y,k} ‖W[y,k,:]‖      W: (Y, K, R)   groups over regions R;
* Γ(Θ)  = (1-β)·½‖Θ‖²_F + β Σ_{k,t} ‖Θ[k,t,:,:]‖    Θ: (K, T, kh, kw) groups over the kernel S;
* Ψ(Θ)  = (1-β)·½‖Θ‖²_F + β Σ_k ‖Θ[k,:,:,:]‖         whole filters (CompressedNet).

Every function returns ``(value, subgradient)``: value a 0-d array (a NumPy scalar on the
CPU) and the subgradient an array of the input's shape, both in the input's dtype and on its
device.  The value stays on the device because reading it into Python on a GPU would stall
the host until the GPU is idle, once per layer and step; ``float(value)`` reads it.
The subgradient of a group norm is g/‖g‖, and exactly 0 at a zero group (0 lies in the
subdifferential, the unit ball, and is the choice that keeps a zero group at zero).

Two ways to train with them (sec. 4.3):

* plain subgradient descent: add ``C·subgradient`` to the data gradient;
* proximal: compute the gradient with ``group_subgradient=False`` (the ℓ2 part only) and,
  after the SGD step, apply the ``prox_*`` operator (group soft-thresholding), which puts
  groups *exactly* at zero instead of letting them oscillate around it.

Only the dictionaries Θ^l and the classifier W are regularized, as in eq. (1); batch-norm
parameters and classifier biases are not.
"""
from dataclasses import dataclass

from .backend import get_array_module

# Group axes of each regularizer, named once so the value, the subgradient and the prox agree.
OMEGA_AXES = (2,)         # W[y, k, :]       (eq. 2)
GAMMA_AXES = (2, 3)       # Θ[k, t, :, :]    (eq. 6)
PSI_AXES = (1, 2, 3)      # Θ[k, :, :, :]    (eq. 7)

VARIANTS = ("simple", "compressed", "compact")


# --------------------------------------------------------------------------- helpers
_SHAPES = {"W": (3, "(Y, K, R)"), "theta": (4, "(K, T, kh, kw)")}


def _check_ndim(x, what):
    ndim, shape = _SHAPES[what]
    if x.ndim != ndim:
        raise ValueError(f"{what} must have shape {shape}, got shape {tuple(x.shape)}")


def _check_mix(name, value):
    value = float(value)  # a NumPy float64 scalar would promote float32 arrays
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def _squared_group_norms(x, group_axes):
    """Σ_{i in g} x_i² of every group, keepdims so it broadcasts against ``x``."""
    return (x * x).sum(axis=tuple(group_axes), keepdims=True)


def group_norms(x, group_axes):
    """Euclidean norm of every group of ``x``.

    x: any shape. group_axes: the axes one group spans (e.g. (2,) for W[y,k,:]).
    Returns the norms with the group axes kept as size 1 (so they broadcast against x),
    in x's dtype and on x's device.
    """
    xp = get_array_module(x)
    return xp.sqrt(_squared_group_norms(x, group_axes))


def _inverse(norms):
    """1/‖g‖ where ‖g‖ > 0 and exactly 0 at a zero group (no division-by-zero warning)."""
    xp = get_array_module(norms)
    positive = norms > 0
    return xp.where(positive, 1 / xp.where(positive, norms, 1), 0).astype(norms.dtype,
                                                                          copy=False)


def group_lasso(x, group_axes):
    """The ℓ_{1,2} group-lasso term Σ_g ‖x_g‖ and a subgradient (eqs. 4, 5).

    x: any shape. group_axes: the axes one group spans.
    Returns ``(value, subgrad)``: value 0-d, subgrad of x's shape, both x's dtype and device;
    the subgradient is x_g/‖x_g‖ on every nonzero group and exactly 0 on a zero group.
    """
    norms = group_norms(x, group_axes)
    return norms.sum(), x * _inverse(norms)


def mixed_term(x, mix, group_axes, group_subgradient):
    """(1-mix)·½‖x‖²_F + mix·Σ_g ‖x_g‖ and its (sub)gradient, sharing one pass over x².

    The gradient is built as one broadcast product x·((1-mix) + mix/‖g‖), so it allocates
    a single array of x's size.
    """
    sq = _squared_group_norms(x, group_axes)
    frob2 = sq.sum()                    # ‖x‖²_F is the sum of the groups' squared norms
    if mix == 0.0:                      # pure weight decay: no group norms needed
        return 0.5 * frob2, (1.0 - mix) * x
    xp = get_array_module(x)
    norms = xp.sqrt(sq)
    value = (1.0 - mix) * 0.5 * frob2 + mix * norms.sum()
    if not group_subgradient:
        return value, (1.0 - mix) * x
    return value, x * ((1.0 - mix) + mix * _inverse(norms))


# --------------------------------------------------------------------------- regularizers
def omega(W, alpha, group_subgradient=True):
    """Classifier regularizer Ω(W), eq. (2): (1-α)·½‖W‖²_F + α Σ_{y,k} ‖W[y,k,:]‖.

    W: (Y, K^{L-1}, R) classifier weights. alpha: mix in [0, 1].
    group_subgradient: when False the returned gradient is the ℓ2 part (1-α)·W only (the
    group part is then left to ``prox_omega``); the value is always complete.
    Returns ``(value, dW)``: a 0-d array and an array like W.
    """
    _check_ndim(W, "W")
    return mixed_term(W, _check_mix("alpha", alpha), OMEGA_AXES, group_subgradient)


def gamma(theta, beta, group_subgradient=True):
    """CompactNet dictionary regularizer Γ_l(Θ), eq. (6).

    Γ(Θ) = (1-β)·½‖Θ‖²_F + β Σ_{k,t} ‖Θ[k,t,:,:]‖: each group holds the S = kh·kw weights
    with which filter k reads input channel t (its contribution C^l(k,t), eq. 5).
    theta: (K^l, K^{l-1}, kh, kw). beta: mix in [0, 1]. group_subgradient: as in ``omega``.
    Returns ``(value, dtheta)``: a 0-d array and an array like theta.
    """
    _check_ndim(theta, "theta")
    return mixed_term(theta, _check_mix("beta", beta), GAMMA_AXES, group_subgradient)


def psi(theta, beta, group_subgradient=True):
    """CompressedNet dictionary regularizer Ψ_l(Θ), eq. (7).

    Ψ(Θ) = (1-β)·½‖Θ‖²_F + β Σ_k ‖Θ[k,:,:,:]‖: one group per whole filter, so it discards
    units rather than connections.
    theta: (K^l, K^{l-1}, kh, kw). beta: mix in [0, 1]. group_subgradient: as in ``omega``.
    Returns ``(value, dtheta)``: a 0-d array and an array like theta.
    """
    _check_ndim(theta, "theta")
    return mixed_term(theta, _check_mix("beta", beta), PSI_AXES, group_subgradient)


# --------------------------------------------------------------------------- proximal operators
def group_soft_threshold(x, tau, group_axes, out=None):
    """Proximal operator of τ·Σ_g ‖x_g‖: x_g · max(0, 1 - τ/‖x_g‖) for every group.

    It solves argmin_z ½‖z - x‖² + τ Σ_g ‖z_g‖: groups with ‖x_g‖ <= τ become exactly zero,
    the others keep their direction and shrink by τ in norm.
    x: any shape. tau: threshold >= 0. group_axes: the axes one group spans.
    out: where to write (pass ``out=x`` to work in place); a new array when None.
    Returns the result, of x's shape and dtype.
    """
    tau = float(tau)
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    xp = get_array_module(x)
    if tau == 0.0:
        if out is None:
            return x.copy()
        if out is not x:
            out[...] = x
        return out
    norms = group_norms(x, group_axes)
    # max(‖g‖, τ) in the denominator gives scale 0 exactly for ‖g‖ <= τ, and never 0/0.
    scale = 1.0 - tau / xp.maximum(norms, tau)
    return xp.multiply(x, scale, out=out)


def prox_omega(W, alpha, step):
    """Group part of Ω's proximal step, in place: W[y,k,:] soft-thresholded by τ = step·α.

    W: (Y, K, R), modified in place and returned. alpha: mix of eq. (2).
    step: lr·C_W (the learning rate times the regularization constant).
    """
    _check_ndim(W, "W")
    return group_soft_threshold(W, step * _check_mix("alpha", alpha), OMEGA_AXES, out=W)


def prox_gamma(theta, beta, step):
    """Group part of Γ's proximal step, in place: Θ[k,t,:,:] soft-thresholded by τ = step·β.

    theta: (K, T, kh, kw), modified in place and returned. beta: mix of eq. (6).
    step: lr·C_Θ.
    """
    _check_ndim(theta, "theta")
    return group_soft_threshold(theta, step * _check_mix("beta", beta), GAMMA_AXES, out=theta)


def prox_psi(theta, beta, step):
    """Group part of Ψ's proximal step, in place: whole filters Θ[k] soft-thresholded by τ = step·β.

    theta: (K, T, kh, kw), modified in place and returned. beta: mix of eq. (7).
    step: lr·C_Θ.
    """
    _check_ndim(theta, "theta")
    return group_soft_threshold(theta, step * _check_mix("beta", beta), PSI_AXES, out=theta)


# --------------------------------------------------------------------------- the three models
@dataclass(frozen=True)
class RegConfig:
    """Which regularizer a model uses (sec. 5.1) and with which mixes.

    name: "simple" | "compressed" | "compact". alpha: mix of Ω (eq. 2).
    betas: one mix per feature layer l = 1..L-1 (a tuple of L-1 floats).
    conv_term: "gamma" (eq. 6, groups Θ[k,t]) or "psi" (eq. 7, whole filters Θ[k]).
    """
    name: str
    alpha: float
    betas: tuple
    conv_term: str

    @property
    def depth(self):
        """L: the feature layers plus the classifier."""
        return len(self.betas) + 1


def _check_depth(depth):
    if isinstance(depth, bool) or int(depth) != depth or depth < 2:
        raise ValueError(f"depth must be an integer >= 2 (L-1 feature layers + classifier), "
                         f"got {depth!r}")
    return int(depth)


def beta_schedule(depth, rho):
    """β^l for l = 1..L-1, rising linearly from β^1 = 0 to β^{L-1} = ρ (sec. 5.3.1).

    depth: L >= 2. rho: the final mix in [0, 1] (the paper sets ρ = α = β^{L-1}).
    Returns a list of L-1 floats.  With depth 2 the only feature layer is the first one,
    whose dictionary acts on pixels, so it gets β^1 = 0 (sec. 5.2: "β^1 is set to 0"), which
    takes precedence over β^{L-1} = ρ.
    """
    depth = _check_depth(depth)
    rho = _check_mix("rho", rho)
    n = depth - 1
    if n == 1:
        return [0.0]
    return [rho * l / (n - 1) for l in range(n)]


def variant(name, depth, rho, compressed_beta=0.1):
    """The regularization of SimpleNet, CompressedNet or CompactNet (secs. 5.1, 5.3.1).

    * "simple":     α = 0, β^l = 0 (weight decay only; Γ and Ψ coincide there);
    * "compressed": α = 0, Ψ (eq. 7) with β = compressed_beta in every feature layer;
    * "compact":    α = ρ, Γ (eq. 6) with β^l = ``beta_schedule(depth, rho)``.

    depth: L >= 2. rho: in [0, 1] (validated for every variant, used by "compact").
    Returns a ``RegConfig``; raises ValueError for an unknown name or a bad depth/ρ/β.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; expected one of {VARIANTS}")
    depth = _check_depth(depth)
    rho = _check_mix("rho", rho)
    compressed_beta = _check_mix("compressed_beta", compressed_beta)
    n = depth - 1
    if name == "simple":
        return RegConfig(name, 0.0, (0.0,) * n, "gamma")
    if name == "compressed":
        return RegConfig(name, 0.0, (compressed_beta,) * n, "psi")
    return RegConfig(name, rho, tuple(beta_schedule(depth, rho)), "gamma")


_CONV_TERMS = {"gamma": (gamma, prox_gamma), "psi": (psi, prox_psi)}
_CONV_AXES = {"gamma": GAMMA_AXES, "psi": PSI_AXES}


def _check_layers(config, thetas):
    if config.conv_term not in _CONV_TERMS:
        raise ValueError(f"conv_term must be one of {tuple(_CONV_TERMS)}, got {config.conv_term!r}")
    if len(thetas) != len(config.betas):
        raise ValueError(f"config has {len(config.betas)} feature layers (betas), "
                         f"got {len(thetas)} dictionaries")


def _per_layer(ctheta, n):
    """C_Θ as n per-layer floats (one float is every layer's)."""
    if isinstance(ctheta, (list, tuple)):
        if len(ctheta) != n:
            raise ValueError(f"got {len(ctheta)} per-layer C_Θ for {n} dictionaries")
        return [float(c) for c in ctheta]
    return [float(ctheta)] * n


def regularized_groups(config, W, thetas, cw=1e-4, ctheta=1e-4):
    """Every term of eq. (1)'s regularizer as ``(array, C, mix, group_axes)``, in the order
    ``regularization`` sums them: ``(W, C_W, α, OMEGA_AXES)``, then ``(Θ^l, C_Θ^l, β^l,
    GAMMA_AXES or PSI_AXES)`` for l = 1..L-1 (arguments as ``regularization``; checked the
    same way).  What the fused kernels of ``cuda/sgd.py`` walk on a GPU.  Returns a list.
    """
    _check_layers(config, thetas)
    _check_ndim(W, "W")
    for theta in thetas:
        _check_ndim(theta, "theta")
    axes = _CONV_AXES[config.conv_term]
    terms = [(W, float(cw), _check_mix("alpha", config.alpha), OMEGA_AXES)]
    for theta, beta, c in zip(thetas, config.betas, _per_layer(ctheta, len(thetas))):
        terms.append((theta, c, _check_mix("beta", beta), axes))
    return terms


def regularization(config, W, thetas, cw=1e-4, ctheta=1e-4, group_subgradient=True):
    """The regularization part of the objective, eq. (1): C_W·Ω(W) + C_Θ·Σ_l Γ_l(Θ^l).

    (Ψ_l instead of Γ_l when ``config.conv_term == "psi"``.)  Only Θ^l and W are
    regularized: batch-norm parameters and classifier biases are not, as in eq. (1).
    config: a RegConfig. W: (Y, K^{L-1}, R). thetas: L-1 arrays (K^l, K^{l-1}, kh, kw).
    cw, ctheta: C_W and C_Θ (ctheta may also be a sequence of L-1 constants, one per
    layer: ``group_scale.scale_groups`` uses that). group_subgradient: False leaves the group parts out of the
    gradients (for ``proximal_step``); the value is always complete.
    Returns ``(value, dW, dthetas)``: a 0-d array (W's dtype and device), an array like W
    and a list like thetas, the gradients already multiplied by C_W and C_Θ.
    """
    _check_layers(config, thetas)
    term = _CONV_TERMS[config.conv_term][0]
    value, dW = omega(W, config.alpha, group_subgradient)
    value = cw * value
    dW *= cw
    dthetas = []
    for theta, beta, ctheta in zip(thetas, config.betas, _per_layer(ctheta, len(thetas))):
        v, d = term(theta, beta, group_subgradient)
        value = value + ctheta * v
        d *= ctheta
        dthetas.append(d)
    return value, dW, dthetas


def proximal_step(config, W, thetas, lr, cw=1e-4, ctheta=1e-4):
    """Apply the group part of every regularizer's proximal operator, in place.

    To be called right after the SGD step whose gradient came from
    ``regularization(..., group_subgradient=False)``: W gets τ = lr·C_W·α, each Θ^l gets
    τ = lr·C_Θ·β^l (per group Θ[k,t] for Γ, per filter Θ[k] for Ψ).
    config: a RegConfig. W: (Y, K^{L-1}, R). thetas: L-1 arrays (K^l, K^{l-1}, kh, kw).
    lr: the current learning rate; ctheta: a float or L-1 floats, as in ``regularization``.
    Returns None (the arrays are modified in place).
    """
    _check_layers(config, thetas)
    prox = _CONV_TERMS[config.conv_term][1]
    prox_omega(W, config.alpha, lr * cw)
    for theta, beta, ctheta in zip(thetas, config.betas, _per_layer(ctheta, len(thetas))):
        prox(theta, beta, lr * ctheta)
