"""Losses: values against direct NumPy formulas, gradients against central differences,
stability, dtype, label validation and top-k counts."""
import numpy as np
import pytest

from minicompact.backend import get_array_module, to_cpu
from minicompact.gradcheck import GradientCheckError, assert_gradients_close, numerical_gradient
from minicompact.losses import (accuracy_topk, check_labels, multiclass_hinge_loss, softmax,
                                softmax_cross_entropy)

LABELS = np.array([0, 3, 1, 3, 2])


def direct_cross_entropy(s, labels):
    p = np.exp(s) / np.exp(s).sum(axis=1, keepdims=True)
    return -np.log(p[np.arange(len(labels)), labels]).mean()


def direct_hinge(s, labels, margin):
    total = 0.0
    for n, l in enumerate(labels):
        total += sum(max(0.0, s[n, y] - s[n, l] + margin) for y in range(s.shape[1]) if y != l)
    return total / len(labels)


def assert_device_scalar(value, like):
    """A 0-d value of ``like``'s dtype on ``like``'s device: the loss never leaves the device."""
    assert value.shape == () and value.dtype == like.dtype, (type(value), value.dtype)
    assert get_array_module(value) is get_array_module(like)


def check_loss_gradient(loss_fn, scores, labels):
    loss, dscores = loss_fn(scores, labels)
    numeric = numerical_gradient(lambda: float(loss_fn(scores, labels)[0]), scores)
    return assert_gradients_close(loss_fn.__name__, dscores, numeric, tol=1e-7)


def test_cross_entropy_value_and_gradient(xp, device):
    s = np.random.default_rng(0).standard_normal((5, 4)) * 2
    loss, dscores = softmax_cross_entropy(xp.asarray(s), xp.asarray(LABELS))
    assert_device_scalar(loss, xp.asarray(s))
    assert abs(float(loss) - direct_cross_entropy(s, LABELS)) < 1e-12
    assert dscores.shape == (5, 4) and type(dscores) is type(xp.asarray(s))
    check_loss_gradient(softmax_cross_entropy, xp.asarray(s), xp.asarray(LABELS))


def test_gradient_check_fails_for_wrong_gradient(xp, device):
    def doubled(scores, labels):
        loss, d = softmax_cross_entropy(scores, labels)
        return loss, 2 * d
    with pytest.raises(GradientCheckError):
        check_loss_gradient(doubled, xp.asarray(np.random.default_rng(1).standard_normal((3, 4))),
                            xp.asarray([0, 1, 2]))


def test_cross_entropy_is_stable_for_huge_scores(xp, device):
    base = np.array([[0.0, -1.0, -3.0], [-2.0, 0.0, -0.5]])
    labels = np.array([1, 1])
    want = direct_cross_entropy(base, labels)  # a shift by a constant changes nothing
    for dtype in (np.float32, np.float64):
        for shift in (1e4, -1e4):
            s = xp.asarray((base + shift).astype(dtype))
            loss, d = softmax_cross_entropy(s, xp.asarray(labels))
            loss = float(loss)
            assert np.isfinite(loss) and abs(loss - want) < 1e-3
            assert d.dtype == dtype and bool(xp.isfinite(d).all())
    s = xp.asarray(np.array([[1e4, -1e4]], np.float32))
    assert float(softmax_cross_entropy(s, xp.asarray([1]))[0]) == pytest.approx(2e4)
    p = to_cpu(softmax(s))
    assert p.dtype == np.float32 and np.isfinite(p).all() and p[0, 0] == 1.0


def test_softmax_rows_sum_to_one(xp, device):
    s = np.random.default_rng(2).standard_normal((3, 6)).astype(np.float32)
    p = to_cpu(softmax(xp.asarray(s)))
    assert p.dtype == np.float32
    np.testing.assert_allclose(p, np.exp(s) / np.exp(s).sum(1, keepdims=True), rtol=1e-6)


def kink_free_scores(shape, labels, margin, seed, gap=1e-2):
    """Scores whose margins s_y - s_label + margin are all at least ``gap`` from 0."""
    rng = np.random.default_rng(seed)
    while True:
        s = rng.standard_normal(shape)
        m = s - s[np.arange(shape[0]), labels][:, None] + margin
        m[np.arange(shape[0]), labels] = 1.0
        if np.abs(m).min() > gap and (m > 0).any() and (m < 0).any():
            return s


@pytest.mark.parametrize("margin", [1.0, 0.5])
def test_hinge_value_and_gradient(xp, device, margin):
    s = kink_free_scores((5, 4), LABELS, margin, seed=3)
    loss, dscores = multiclass_hinge_loss(xp.asarray(s), xp.asarray(LABELS), margin)
    assert_device_scalar(loss, xp.asarray(s))
    assert abs(float(loss) - direct_hinge(s, LABELS, margin)) < 1e-12
    fn = lambda sc, lb: multiclass_hinge_loss(sc, lb, margin)  # noqa: E731
    fn.__name__ = "multiclass_hinge_loss"
    check_loss_gradient(fn, xp.asarray(s), xp.asarray(LABELS))


def test_float32_stays_float32(xp, device):
    s = xp.asarray(np.random.default_rng(4).standard_normal((5, 4)).astype(np.float32))
    for fn in (softmax_cross_entropy, multiclass_hinge_loss):
        loss, d = fn(s, LABELS)  # NumPy labels are moved to the scores' device
        assert_device_scalar(loss, s)
        assert d.dtype == np.float32


def test_label_validation():
    s = np.zeros((3, 4), np.float32)
    for fn in (softmax_cross_entropy, multiclass_hinge_loss, accuracy_topk):
        with pytest.raises(ValueError, match=r"labels in \[0, 4\).*\[0, 4\]"):
            fn(s, np.array([0, 4, 1]))
        with pytest.raises(ValueError, match=r"\[-1, 1\]"):
            fn(s, np.array([0, -1, 1]))
        with pytest.raises(ValueError, match=r"shape \(3,\).*\(2,\)"):
            fn(s, np.array([0, 1]))
        with pytest.raises(ValueError, match="integer"):
            fn(s, np.array([0.0, 1.0, 2.0]))
        with pytest.raises(ValueError, match=r"\(N, Y\).*\(3, 4, 1\)"):
            fn(s[..., None], np.array([0, 1, 2]))


def test_check_labels_validates_host_labels():
    """The check the training loop runs on each batch's labels while they are on the host."""
    assert check_labels([0, 3, 1], 4).tolist() == [0, 3, 1]
    check_labels(np.zeros(0, np.int64), 4)   # an empty batch has no range to check
    with pytest.raises(ValueError, match=r"training batch expects labels in \[0, 4\), got labels in \[0, 4\]"):
        check_labels(np.array([0, 4]), 4, "training batch")
    with pytest.raises(ValueError, match=r"\[-2, 0\]"):
        check_labels(np.array([-2, 0]), 4)
    with pytest.raises(ValueError, match="integer"):
        check_labels(np.array([0.5]), 4)


def test_accuracy_topk(xp, device):
    s = np.array([[0.1, 0.5, 0.2, 0.9],    # label 3: top-1
                  [0.4, 0.3, 0.2, 0.1],    # label 2: rank 3
                  [0.0, 0.8, 0.9, 0.1],    # label 1: rank 2
                  [0.5, 0.5, 0.5, 0.5]])   # ties count against the label: rank 4
    labels = np.array([3, 2, 1, 0])
    got = accuracy_topk(xp.asarray(s), xp.asarray(labels), ks=(1, 2, 3, 5))
    assert tuple(int(v) for v in got) == (1, 2, 3, 4)
    assert all(v.shape == () and get_array_module(v) is xp for v in got)   # counts stay on the device
    c1, c5 = accuracy_topk(xp.asarray(s), xp.asarray(labels))  # default ks = (1, 5)
    assert (int(c1), int(c5)) == (1, 4)
