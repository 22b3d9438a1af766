"""One gradient check through a whole chain of layers, input included (paper sec. 3):

conv 7x7 → BN → ReLU → max-pool/2 → conv 3x3 → BN → ReLU → max-pool/1 → SPP → classifier → CE

Through two batch norms, a two-point difference small enough to be accurate drowns in
rounding noise for the smallest input gradients, so this check uses the five-point stencil
(error O(h⁴)) at h = 3e-4 and the plain 1e-7 tolerance.  (At h = 1e-4 rounding noise alone
reached 1.1e-7 on one input entry with a tiny gradient, with OpenBLAS 0.3.31; at 3e-4 the
worst entry is 3e-8, and h = 1e-3 already steps across max-pool kinks.)
"""
import numpy as np

from minicompact.gradcheck import assert_gradients_close, numerical_gradient
from minicompact.layers import (BatchNorm2D, Conv2D, MaxPool2D, ReLU, SoftmaxClassifier,
                                SpatialPyramidPool)
from minicompact.losses import softmax_cross_entropy


def build_chain(rng):
    layers = [Conv2D(3, 4, 7, padding=3, dtype=np.float64, rng=rng), BatchNorm2D(4, dtype=np.float64),
              ReLU(), MaxPool2D(3, stride=2, padding=1),
              Conv2D(4, 5, 3, padding=1, dtype=np.float64, rng=rng), BatchNorm2D(5, dtype=np.float64),
              ReLU(), MaxPool2D(3, stride=1, padding=1), SpatialPyramidPool((1, 2, 4))]
    layers.append(SoftmaxClassifier(5, 21, 3, dtype=np.float64, rng=rng))
    for bn in (layers[1], layers[5]):  # non-trivial affine parameters
        bn.params["gamma"][:] = rng.uniform(0.5, 1.5, bn.params["gamma"].shape)
        bn.params["beta"][:] = rng.uniform(-0.3, 0.3, bn.params["beta"].shape)
    return layers


def test_whole_chain_gradient_check():
    rng = np.random.default_rng(7)
    layers = build_chain(rng)
    x = rng.standard_normal((2, 3, 9, 11))  # odd, non-square
    y = np.array([2, 0])

    def loss():
        h = x
        for layer in layers:
            h = layer.forward(h)
        return softmax_cross_entropy(h, y)

    value, d = loss()
    for layer in reversed(layers):
        d = layer.backward(d)
    analytic = {"x": d}
    for i, layer in enumerate(layers):
        for k, g in layer.grads.items():
            analytic[f"{i}:{type(layer).__name__}.{k}"] = g.copy()
    targets = {"x": x}
    for i, layer in enumerate(layers):
        for k, p in layer.params.items():
            targets[f"{i}:{type(layer).__name__}.{k}"] = p
    assert len(analytic) == len(targets) == 9  # x, 2 conv W, 2 × BN (gamma, beta), classifier W and b
    for name, target in targets.items():
        numeric = numerical_gradient(lambda: loss()[0], target, h=3e-4, points=4)
        assert_gradients_close(name, analytic[name], numeric, tol=1e-7,
                               floor=1e-12)
