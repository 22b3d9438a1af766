"""The lessons' exercise checker: it passes a right answer and names each usual mistake."""
import numpy as np
import pytest

from minicompact.exercises import ExerciseError, check_exercise, diagnose
from minicompact.im2col import im2col


@pytest.fixture
def e(rng):
    return rng.standard_normal((3, 4, 5))


def test_a_match_is_none_and_scale_free(e):
    assert diagnose(e.copy(), e) is None
    assert diagnose(1e6 * e + 1e-4, 1e6 * e) is None          # atol scales with |expected|
    assert diagnose(e + 1e-3, e) is not None


@pytest.mark.parametrize("wrong, words", [
    (lambda e: 2 * e, "constant factor 2"),
    (lambda e: 0.5 * e, "constant factor 0.5"),
    (lambda e: -e, "wrong sign"),
    (lambda e: e.transpose(0, 2, 1)[:, :4, :4], "has shape (3, 4, 4)"),
    (lambda e: e.T, "transposed by axes (2, 1, 0)"),
    (lambda e: e[0].T, "has shape (5, 4), expected (4, 5): it is the transpose"),
    (lambda e: e.reshape(5, 4, 3), "the transpose?"),
    (lambda e: e.reshape(6, 2, 5), "another layout"),
    (lambda e: e.reshape(4, 3, 5), "axes in the wrong order"),
    (lambda e: e.astype(np.float32), "dtype float32"),
    (lambda e: np.flip(e, axis=2), "reversed along axis 2"),
    (lambda e: None, "returned None"),
    (lambda e: np.where(np.arange(e.size).reshape(e.shape) == 7, 0.0, e), "differs in 1 of 60"),
    (lambda e: np.full(e.shape, np.nan), "non-finite"),
    (lambda e: e[:, [1, 0, 3, 2]], "right values along axis 1, in another order"),
    (lambda e: np.random.default_rng(1).permutation(e.reshape(-1)).reshape(e.shape), "wrong places"),
])
def test_each_usual_mistake_is_named(e, wrong, words):
    expected = e[0] if words.startswith("has shape (5, 4)") else e
    assert words in diagnose(wrong(e), expected)


def test_swapped_axes_of_equal_length(rng):
    e = rng.standard_normal((2, 3, 4, 4))
    assert "axes 2 and 3 swapped" in diagnose(e.transpose(0, 1, 3, 2), e)


def test_check_exercise_passes_a_right_answer_and_names_the_input(rng):
    x = rng.standard_normal((2, 3, 5, 5))
    inputs = [(x, 3, 3, 1, 1), (x, 3, 3, 2, 0)]

    def my_im2col(x, kh, kw, stride, padding):
        return im2col(x, kh, kw, stride, padding).copy()

    assert check_exercise(my_im2col, im2col, inputs) == 2

    def doubled(x, kh, kw, stride, padding):
        return 2 * im2col(x, kh, kw, stride, padding)

    with pytest.raises(ExerciseError, match=r"doubled, input 0 \(shapes \(2, 3, 5, 5\)\): its result is off by a constant factor 2"):
        check_exercise(doubled, im2col, inputs)


def test_check_exercise_not_implemented_and_multiple_outputs(rng):
    a = rng.standard_normal((3, 3))

    def my_pair(a):
        raise NotImplementedError

    with pytest.raises(ExerciseError, match="my_pair is not implemented yet"):
        check_exercise(my_pair, lambda a: (a, a.T), [(a,)])

    def half_right(a):
        return a, a

    with pytest.raises(ExerciseError, match="dT has axes 0 and 1 swapped"):
        check_exercise(half_right, lambda a: (a, a.T), [(a,)], names=["d", "dT"])
    with pytest.raises(ExerciseError, match="returned 1 values, expected 2"):
        check_exercise(lambda a: [a], lambda a: (a, a.T), [(a,)])


def test_inputs_are_copied_for_in_place_functions(rng):
    p = rng.standard_normal(4)

    def in_place(p):
        p -= 1.0
        return p

    check_exercise(in_place, in_place, [(p,)])              # each call sees the original p
    assert np.array_equal(p, p.copy())
