"""The linear classifier on fixed features: gradient checks, separable data, the λ chooser."""
import numpy as np
import pytest

from minicompact import linear_probe
from minicompact.gradcheck import numerical_gradient, rel_error


def numeric_grad(f, theta):
    """Central differences of f(theta) (float64, theta perturbed in place and restored)."""
    return numerical_gradient(lambda: f(theta), theta, h=1e-6)


def problem(seed=0, n=12, d=5, y=4):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    labels = rng.integers(0, y, n)
    theta = rng.standard_normal(d * y + y) * 0.7
    return X, labels, y, theta


def away_from_kinks(X, labels, y, theta, gap=1e-3):
    """The squared hinge is C¹ but not C²: keep every margin 1 - t·s away from 0 anyway."""
    d = X.shape[1]
    s = X @ theta[:d * y].reshape(d, y) + theta[d * y:]
    t = -np.ones_like(s)
    t[np.arange(len(labels)), labels] = 1
    return np.abs(1 - t * s).min() > gap


@pytest.mark.parametrize("loss", linear_probe.LOSSES)
def test_gradient_of_loss_plus_l2(loss):
    for seed in range(20):
        X, labels, y, theta = problem(seed)
        if loss == "softmax" or away_from_kinks(X, labels, y, theta):
            break
    lam = 0.3
    value, grad = linear_probe.objective(theta, X, labels, y, lam, loss)
    num = numeric_grad(lambda t: linear_probe.objective(t, X, labels, y, lam, loss)[0], theta.copy())
    err, _ = rel_error(grad, num)
    assert err < 1e-6, err
    # The hinge must be active somewhere, or the check would not test its gradient.
    assert value > 0.5 * lam * (theta[:-y] ** 2).sum() + 1e-3


@pytest.mark.parametrize("loss", linear_probe.LOSSES)
def test_a_wrong_gradient_fails_the_check(loss, monkeypatch):
    X, labels, y, theta = problem(1)
    lam = 0.3
    f = linear_probe.objective
    _, grad = f(theta, X, labels, y, lam, loss)
    num = numeric_grad(lambda t: f(t, X, labels, y, lam, loss)[0], theta.copy())
    d = X.shape[1]
    wrong_l2 = grad.copy()
    wrong_l2[:d * y] += lam * theta[:d * y]          # 2λW instead of λW
    wrong_bias = grad.copy()
    wrong_bias[d * y:] *= 2                          # a factor of two on db
    for wrong in (wrong_l2, wrong_bias):
        assert rel_error(wrong, num)[0] > 1e-2


@pytest.mark.parametrize("loss", linear_probe.LOSSES)
def test_separable_data_is_learned(loss):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 20)) * 4
    labels = np.repeat(np.arange(5), 40)
    X = centres[labels] + rng.standard_normal((200, 20))
    clf = linear_probe.LinearClassifier(loss, lam=1e-3).fit(X, labels, 5)
    top1, top5 = clf.errors(X, labels)
    assert top1 == 0.0 and top5 == 0.0
    Xt = centres[labels] + rng.standard_normal((200, 20))
    assert clf.errors(Xt, labels)[0] <= 1.0
    crops = np.stack([Xt, Xt + 0.01], axis=1)        # (N, 2, D): two "crops" per image
    assert clf.scores(crops).shape == (200, 5)
    assert clf.errors(crops, labels)[0] <= 1.0


def test_stratified_split_holds_out_every_class():
    labels = np.repeat(np.arange(3), [10, 5, 2])
    fit, held = linear_probe.stratified_split(labels, 0.2, seed=0)
    assert np.intersect1d(fit, held).size == 0 and fit.size + held.size == labels.size
    assert sorted(np.bincount(labels[held]).tolist()) == [1, 1, 2]


def test_choose_lambda_prefers_strong_regularisation_on_noise_features():
    """Few images, many pure-noise features and one informative one: a tiny λ overfits the
    noise, a large one keeps the signal; the chooser must not pick the smallest λ."""
    rng = np.random.default_rng(0)
    n, d = 60, 200
    labels = rng.integers(0, 2, n)
    X = rng.standard_normal((n, d))
    X[:, 0] += 1.5 * (2 * labels - 1)
    grid = (1e-4, 1.0, 30.0)
    lam, table = linear_probe.choose_lambda(X, labels, 2, "svm", grid, seed=0)
    assert set(table) == set(grid)
    assert lam != 1e-4 and table[lam] < table[1e-4]
    clf, info = linear_probe.fit_linear(X, labels, 2, "softmax", grid, seed=0)
    assert info["lambda"] in grid and clf.W.shape == (d, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss must be one of"):
        linear_probe.LinearClassifier("crammer")
    with pytest.raises(ValueError, match="labels in"):
        linear_probe.LinearClassifier().fit(np.zeros((3, 2)), np.array([0, 1, 5]), 2)
