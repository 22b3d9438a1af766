"""Finite-difference gradient checking, as in CS231n, used by the tests and the lessons.

The recipe: compute in float64, pick a *random* upstream gradient ``dout`` so that the
scalar ``f = sum(forward(x) * dout)`` has ``df/dout-input = backward(dout)``, perturb one
entry at a time by ±h (central differences) and compare with the analytic gradient using
the relative error ``max_i |a_i - n_i| / max(floor, |a_i| + |n_i|)``.

A correct float64 backward gives errors around 1e-9 or smaller; a wrong factor of two gives
1/3, a transposed index or a missing term gives errors of order one.
"""
import numpy as np

from .backend import to_cpu, to_device


def rel_error(analytic, numeric, floor=1e-12):
    """CS231n relative error ``max_i |a_i - n_i| / max(floor, |a_i| + |n_i|)``.

    ``floor`` keeps entries whose true gradient is (nearly) zero from dividing rounding
    noise by zero; tests may raise it to a small fraction of the gradient's scale.
    Returns ``(error, index_of_worst_element)``.
    """
    a = np.asarray(to_cpu(analytic), dtype=np.float64)
    n = np.asarray(to_cpu(numeric), dtype=np.float64)
    if a.shape != n.shape:
        raise ValueError(f"analytic gradient has shape {a.shape}, numeric has {n.shape}")
    if a.size == 0:
        return 0.0, ()
    err = np.abs(a - n) / np.maximum(floor, np.abs(a) + np.abs(n))
    worst = np.unravel_index(int(np.argmax(err)), err.shape)
    return float(err[worst]), tuple(int(i) for i in worst)


def numerical_gradient(f, x, h=1e-5, points=2):
    """Central-difference gradient of the scalar function ``f()`` w.r.t. array ``x``.

    ``x`` is perturbed *in place* (one entry at a time) and restored, so ``f`` may read it
    from wherever it lives (a layer's ``params`` dict, say).  x: any shape, float64.
    points: 2 for the classic (f(x+h) - f(x-h)) / 2h, error O(h²); 4 for the five-point
    stencil (-f(x+2h) + 8f(x+h) - 8f(x-h) + f(x-2h)) / 12h, error O(h⁴) — for long chains
    (batch-norm, many layers) where a step small enough for O(h²) drowns in rounding noise.
    Returns an array of x's shape on x's device.
    """
    if x.dtype != np.float64:
        raise ValueError(f"gradient checks need float64 arrays, got {x.dtype}")
    if points not in (2, 4):
        raise ValueError(f"points must be 2 or 4, got {points}")
    grad = np.zeros(x.shape, dtype=np.float64)
    if not x.flags.c_contiguous:  # reshape(-1) would copy, and perturbing the copy does nothing
        raise ValueError("numerical_gradient needs a C-contiguous array it can perturb in place")
    flat = x.reshape(-1)  # a view: writing to it perturbs x
    gflat = grad.reshape(-1)

    def at(i, old, delta):
        flat[i] = old + delta
        return float(f())

    for i in range(flat.size):
        old = float(flat[i])
        if points == 2:
            gflat[i] = (at(i, old, h) - at(i, old, -h)) / (2.0 * h)
        else:
            gflat[i] = (-at(i, old, 2 * h) + 8 * at(i, old, h) - 8 * at(i, old, -h)
                        + at(i, old, -2 * h)) / (12.0 * h)
        flat[i] = old
    if not isinstance(x, np.ndarray):
        return to_device(grad, "gpu")
    return grad


class GradientCheckError(AssertionError):
    """A gradient check failed; the message names the array, its shape and worst element."""


def assert_gradients_close(name, analytic, numeric, tol=1e-7, floor=1e-12):
    """Raise ``GradientCheckError`` if ``rel_error(analytic, numeric) > tol``."""
    err, worst = rel_error(analytic, numeric, floor)
    if not err <= tol:  # also catches NaN
        a = float(to_cpu(analytic)[worst] if np.ndim(analytic) else to_cpu(analytic))
        n = float(to_cpu(numeric)[worst] if np.ndim(numeric) else to_cpu(numeric))
        raise GradientCheckError(
            f"gradient of {name} (shape {tuple(np.shape(analytic))}) has relative error "
            f"{err:.3e} > {tol:.0e}; worst element {worst}: analytic {a!r}, numeric {n!r}")
    return err


def check_layer(layer, x, dout=None, tol=1e-7, h=1e-5, floor=1e-12, seed=0, check_input=True,
                points=2):
    """Gradient-check a layer's ``backward`` against central differences.

    layer: an object with ``forward(x)``, ``backward(dout)``, ``params`` and ``grads`` (all
    arrays float64). x: the layer's input, float64. dout: upstream gradient of the output's
    shape (random normal when omitted). points: 2 or 4, the stencil of ``numerical_gradient``
    (4 for layers such as batch-norm whose curvature makes a two-point difference noisy).
    Checks dL/dx and every parameter gradient, raising ``GradientCheckError`` naming the
    first one that fails. Returns ``{name: rel_error}``.
    """
    out = layer.forward(x)
    if dout is None:
        rng = np.random.default_rng(seed)
        dout = rng.standard_normal(out.shape)
        if not isinstance(out, np.ndarray):
            dout = to_device(dout, "gpu")
    dout_copy = dout.copy()
    dx = layer.backward(dout)
    if not bool((dout == dout_copy).all()):
        raise GradientCheckError(f"{type(layer).__name__}.backward modified dout in place")
    analytic = {"x": dx} if check_input else {}
    analytic.update({k: g.copy() for k, g in layer.grads.items()})

    def f():
        return (layer.forward(x) * dout).sum()

    errors = {}
    for name, a in analytic.items():
        target = x if name == "x" else layer.params[name]
        n = numerical_gradient(f, target, h, points)
        errors[name] = assert_gradients_close(f"{type(layer).__name__}.{name}", a, n, tol, floor)
    return errors
