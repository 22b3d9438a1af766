"""The CompactNet builder (paper sec. 3, 5.1, 5.3.1): structure, init, save/load, eq. 1 gradients."""
import numpy as np
import pytest

from minicompact.gradcheck import assert_gradients_close, numerical_gradient
from minicompact.model import CompactNet, ModelConfig, dictionary_sizes
from minicompact.objective import Penalty, objective
from minicompact.regularizers import variant


@pytest.mark.parametrize("depth, expected", [
    (2, [128]), (3, [128, 256]), (4, [128, 256, 512]), (5, [128, 256, 512, 512]),
    (6, [128, 256, 256, 512, 512]), (7, [128] * 2 + [256] * 2 + [512] * 2),
    (12, [128] * 3 + [256] * 4 + [512] * 4), (18, [128] * 5 + [256] * 6 + [512] * 6)])
def test_dictionary_sizes_split_into_three_groups(depth, expected):
    assert dictionary_sizes(depth) == expected


def test_dictionary_sizes_width_mult_and_errors():
    assert dictionary_sizes(4, width_mult=0.25) == [32, 64, 128]
    assert dictionary_sizes(4, width_mult=0.001) == [1, 1, 1]
    with pytest.raises(ValueError, match="depth"):
        dictionary_sizes(1)
    with pytest.raises(ValueError, match="width_mult"):
        dictionary_sizes(4, width_mult=0)


def _imagenet_param_count(depth, classes=1000):
    """An independent count of the parameters: convs, 2 BN params per filter, W and b."""
    sizes = dictionary_sizes(depth)
    ins = [3] + sizes[:-1]
    conv = sum(k * t * (49 if l == 0 else 9) for l, (k, t) in enumerate(zip(sizes, ins)))
    return conv + 2 * sum(sizes) + classes * sizes[-1] * 21 + classes


def test_depth12_imagenet_parameter_count_matches_the_paper():
    model = CompactNet(ModelConfig(depth=12, num_classes=1000, stem="imagenet"))
    count = model.parameter_count()
    assert count == _imagenet_param_count(12) == 21_395_560
    assert 19e6 <= count <= 22e6  # Fig. 9: all models between 19 and 22 M parameters


@pytest.mark.parametrize("depth", range(2, 19))
def test_every_depth_builds_and_runs(depth):
    model = CompactNet(ModelConfig(depth=depth, num_classes=5, width_mult=1 / 64, stem="small"), seed=1)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    scores = model.forward(x)
    assert scores.shape == (2, 5) and scores.dtype == np.float32
    assert model.backward(np.ones_like(scores)) is None  # no input gradient unless asked for
    with_dx = CompactNet(model.config, seed=1, input_grad=True)
    with_dx.forward(x)
    assert with_dx.backward(np.ones_like(scores)).shape == x.shape
    assert model.parameter_count() > 0


def test_structure_strides_and_kernels():
    model = CompactNet(ModelConfig(depth=12, num_classes=10, width_mult=1 / 16, stem="imagenet"))
    sizes = dictionary_sizes(12, width_mult=1 / 16)
    assert [c.params["W"].shape[0] for c in model.convs] == sizes
    assert model.convs[0].params["W"].shape[2:] == (7, 7)
    assert all(c.params["W"].shape[2:] == (3, 3) for c in model.convs[1:])
    strides = [p.stride for p in model.pools]
    strides = [s[0] if isinstance(s, tuple) else s for s in strides]
    doubled = [l for l in range(1, len(sizes)) if sizes[l] > sizes[l - 1]]
    assert strides[0] == 2 and all(strides[l] == (2 if l in doubled else 1) for l in range(1, len(sizes)))
    x = np.zeros((1, 3, 224, 224), np.float32)
    for layer in model.layers[:-2]:
        x = layer.forward(x)
    assert x.shape[2:] == (14, 14)  # 224 → 112 (conv) → 56 (pool) → 28 → 14
    assert model.classifier.params["W"].shape == (10, sizes[-1], 21)


@pytest.mark.parametrize("depth, stem, size", [
    (12, "imagenet", 224), (12, "imagenet", 97), (12, "small", 33), (3, "small", 16), (7, "imagenet", 50),
    (7, "imagenet", 40)])
def test_pyramid_input_side_is_what_the_layers_produce(depth, stem, size):
    """The one rule the command line asks the model: which maps reach the pyramid."""
    config = ModelConfig(depth=depth, num_classes=3, width_mult=1 / 64, stem=stem)
    x = np.zeros((1, 3, size, size), np.float32)
    for layer in CompactNet(config).layers[:-2]:
        x = layer.forward(x)
    assert x.shape[2:] == (config.pyramid_input_side(size),) * 2
    if x.shape[2] < 4:
        with pytest.raises(ValueError, match=r"needs >= 4x4"):
            config.check_image_size(size)
    else:
        assert config.check_image_size(size) == x.shape[2]


def test_he_initialisation_standard_deviations():
    model = CompactNet(ModelConfig(depth=4, num_classes=50, width_mult=0.5), seed=3)
    for conv in model.convs:
        K, T, kh, kw = conv.params["W"].shape
        assert np.std(conv.params["W"]) == pytest.approx(np.sqrt(2 / (kh * kw * T)), rel=0.05)
    Y, K, R = model.classifier.params["W"].shape
    assert np.std(model.classifier.params["W"]) == pytest.approx(np.sqrt(2 / (R * K)), rel=0.05)


def test_save_and_load_give_identical_predictions(tmp_path):
    model = CompactNet(ModelConfig(depth=4, num_classes=3, width_mult=1 / 32, stem="small",
                                   classes=["a", "b", "c"]), seed=2)
    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    for _ in range(2):  # move the running statistics away from their initial values
        model.forward(x)
    path = tmp_path / "m.npz"
    model.save(path)
    loaded = CompactNet.load(path)
    assert loaded.config == model.config
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    assert model.training  # predict restores the mode


@pytest.mark.parametrize("name", ["simple", "compressed", "compact"])
def test_whole_objective_gradient_check(name):
    """Eq. 1 (data loss + C_W Ω + C_Θ Σ Γ_l or Ψ_l) against central differences, float64."""
    model = CompactNet(ModelConfig(depth=3, num_classes=3, width_mult=1 / 64, stem="small"),
                       seed=8).astype(np.float64)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 3, 8, 8))
    y = np.array([0, 2, 1])
    # Large C's so the regularizer's share of every gradient is well above rounding noise.
    reg = Penalty(model, variant(name, 3, 0.5), cw=0.05, ctheta=0.05)

    def f():
        model.zero_grad()
        return objective(model, x, y, reg)[0]

    f()
    analytic = {f"{n}.{k}": g.copy() for n, layer in model.named_layers() for k, g in layer.grads.items()}
    for n, layer in model.named_layers():
        for k, p in layer.params.items():
            numeric = numerical_gradient(f, p, h=1e-4, points=4)
            assert_gradients_close(f"{n}.{k}", analytic[f"{n}.{k}"], numeric, tol=1e-7)
