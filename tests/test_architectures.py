"""VGG11 and ResNet18 as minicompact networks (paper sec. 5.3.4, Table 3): structure and
parameter counts, β per conv, whole-network gradients of eq. 1 in float64, training with each
regularizer, save/load, and the training API (Trainer, checkpoints, report) unchanged."""
import json

import numpy as np
import pytest

from minicompact.architectures import (ArchConfig, ResNet18, VGG11, build_architecture, load_architecture,
                                       variant_for)
from minicompact.gradcheck import GradientCheckError, assert_gradients_close, numerical_gradient
from minicompact.layers.activations import ReLU
from minicompact.layers.residual import BasicBlock
from minicompact.losses import softmax_cross_entropy
from minicompact.model import CompactNet
from minicompact.objective import Penalty, objective, train_step
from minicompact.optim import SGD, StepLR
from minicompact.regularizers import beta_schedule, variant

TINY = dict(num_classes=3, width_mult=1 / 16, stem="small")


def tiny(arch, seed=0, dtype=np.float32, input_grad=False):
    """Widths ×1/16, 3 classes, the small stem; VGG11's pyramid (1, 2) fits 16-px images."""
    levels = (1, 2) if arch == "vgg11" else None
    return build_architecture(ArchConfig(arch=arch, levels=levels, **TINY), seed=seed, dtype=dtype,
                              input_grad=input_grad)


# ----------------------------------------------------------------------------- parameter counts
def resnet18_count(classes, imagenet):
    """Counted by hand: stem conv + BN, per block two 3×3 convs + BNs (+ 1×1 conv + BN where the
    width changes), then a linear classifier on 512 features (W and b)."""
    total, c = 3 * 64 * (49 if imagenet else 9) + 2 * 64, 64
    for k in (64, 64, 128, 128, 256, 256, 512, 512):
        total += c * k * 9 + 2 * k + k * k * 9 + 2 * k + (c * k + 2 * k if c != k else 0)
        c = k
    return total + 512 * classes + classes


def vgg11_count(classes, regions=21):
    widths = [64, 128, 256, 256, 512, 512, 512, 512]
    convs = sum(t * k * 9 for t, k in zip([3] + widths[:-1], widths))
    return convs + 2 * sum(widths) + classes * 512 * regions + classes


@pytest.mark.parametrize("arch, stem, classes, expected", [
    ("resnet18", "small", 10, 11_173_962),     # the CIFAR ResNet18 with a linear head
    ("resnet18", "imagenet", 1000, 11_689_512),  # torchvision's resnet18
    ("vgg11", "small", 10, 9_330_762),
    ("vgg11", "imagenet", 1000, 19_976_232),   # the three FC layers of VGG11 (123 M) not built
])
def test_full_width_parameter_counts(arch, stem, classes, expected):
    model = build_architecture(ArchConfig(arch=arch, num_classes=classes, stem=stem))
    independent = resnet18_count(classes, stem == "imagenet") if arch == "resnet18" else vgg11_count(classes)
    assert model.parameter_count() == independent == expected
    W = model.classifier.params["W"]
    assert W.shape == ((classes, 512, 1) if arch == "resnet18" else (classes, 512, 21))


# ----------------------------------------------------------------------------- structure
@pytest.mark.parametrize("arch", ["vgg11", "resnet18"])
@pytest.mark.parametrize("stem, width_mult", [("small", 1 / 16), ("imagenet", 0.3), ("small", 0.001)])
def test_the_config_describes_the_network_it_builds(arch, stem, width_mult):
    config = ArchConfig(arch=arch, num_classes=4, width_mult=width_mult, stem=stem)
    model = build_architecture(config)
    built = {f"{n}.{k}": tuple(v.shape) for n, layer in model.named_layers()
             for store in (layer.params, layer.buffers) for k, v in store.items()}
    assert built == config.state_shapes()
    assert set(model.state_arrays()) == set(built)
    assert [c.stride for c in model.convs] == [s.stride for s in config.conv_plan()]
    assert len(model.thetas()) == len(model.convs) == len(model.bns) == (8 if arch == "vgg11" else 20)
    assert all(t is c.params["W"] for t, c in zip(model.thetas(), model.convs))
    assert set(map(id, model.param_layers)) == {id(layer) for _, layer in model.named_layers()}
    assert model.parameter_count() == sum(int(np.prod(s)) for k, s in built.items() if "running" not in k)


def test_resnet18_blocks_projections_and_depth_indices():
    model = ResNet18(**TINY)
    plan = model.config.conv_plan()
    assert [s.name for s in plan if "shortcut" in s.name] == [f"layer{i}.0.shortcut.conv" for i in (2, 3, 4)]
    assert [s.kernel for s in plan if "shortcut" in s.name] == [1, 1, 1]
    assert [b.conv1.stride for b in model.blocks] == [1, 1, 2, 1, 2, 1, 2, 1]
    main = [s.depth for s in plan if "shortcut" not in s.name]
    assert main == list(range(1, 18)) and model.depth == 18          # 17 convs + the classifier
    for s in plan:
        if "shortcut" in s.name:  # a projection reads the block's input, as the block's conv1 does
            assert s.depth == next(t.depth for t in plan if t.name == s.name.replace("shortcut.conv", "conv1"))
    assert VGG11(**TINY).depth == 9 and VGG11(**TINY).conv_depths() == list(range(1, 9))


@pytest.mark.parametrize("arch, stem, size, side", [
    ("vgg11", "small", 32, 4), ("vgg11", "imagenet", 224, 14), ("vgg11", "small", 16, 2),
    ("resnet18", "small", 32, 4), ("resnet18", "imagenet", 224, 7), ("resnet18", "imagenet", 64, 2)])
def test_head_side_is_what_the_layers_produce(arch, stem, size, side):
    config = ArchConfig(arch=arch, num_classes=3, width_mult=1 / 64, stem=stem)
    model = build_architecture(config)
    x = np.zeros((1, 3, size, size), np.float32)
    for step in model.sequence[:-2]:
        x = step.forward(x)
    assert x.shape[2:] == (side, side) == (config.head_side(size),) * 2
    if side < max(config.pyramid_levels, default=1):
        with pytest.raises(ValueError, match=r"leaves 2x2 feature maps before the spatial pyramid"):
            config.check_image_size(size)
    else:
        assert config.check_image_size(size) == side
    assert ArchConfig.stem_for("auto", size) == ("small" if size < 96 else "imagenet")


def test_forward_backward_shapes_and_dtypes():
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    for arch in ("vgg11", "resnet18"):
        model = tiny(arch)
        scores = model.forward(x)
        assert scores.shape == (2, 3) and scores.dtype == np.float32
        assert model.backward(np.ones_like(scores)) is None   # no input gradient unless asked for
        assert all(g.dtype == np.float32 for layer in model.param_layers for g in layer.grads.values())
        with_dx = tiny(arch, input_grad=True)
        with_dx.forward(x)
        assert with_dx.backward(np.ones_like(scores)).shape == x.shape


def test_both_take_sync_batchnorm_where_their_data_path_reads_it():
    """use_sync_batchnorm swaps layers with ``replace_layer``: VGG11's forward runs its list;
    ResNet18's blocks hold their own layers, so the swap reaches them and the tuples follow.
    With one process a SyncBatchNorm2D computes the same bits, forward and backward."""
    from minicompact.distributed.comm import Communicator
    from minicompact.distributed.sync_batchnorm import SyncBatchNorm2D, use_sync_batchnorm
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    for arch, count in (("vgg11", 8), ("resnet18", 20)):
        model, plain = tiny(arch), tiny(arch)
        use_sync_batchnorm(model, Communicator())
        assert all(isinstance(b, SyncBatchNorm2D) for b in model.bns) and len(model.bns) == count
        assert sum(isinstance(layer, SyncBatchNorm2D) for layer in model.layers) == count
        if arch == "resnet18":
            assert all(isinstance(b.bn1, SyncBatchNorm2D) for b in model.blocks)
        scores = model.forward(x)
        np.testing.assert_array_equal(scores, plain.forward(x))
        d = np.random.default_rng(1).standard_normal(scores.shape).astype(np.float32)
        model.backward(d), plain.backward(d)
        for (name, a), (_, b) in zip(model.named_layers(), plain.named_layers()):
            for k in a.grads:
                np.testing.assert_array_equal(a.grads[k], b.grads[k], err_msg=f"{arch} {name}.{k}")
    with pytest.raises(TypeError):   # the tuples themselves still refuse a swap that would not reach the data
        tiny("resnet18").bns[0] = None


def test_config_errors():
    with pytest.raises(ValueError, match="arch must be one of"):
        ArchConfig(arch="vgg16").validate()
    with pytest.raises(ValueError, match="ResNet18 pools globally"):
        ArchConfig(arch="resnet18", levels=(1, 2)).validate()
    with pytest.raises(ValueError, match="ResNet18 needs a configuration of arch 'resnet18'"):
        ResNet18(ArchConfig(arch="vgg11"))
    with pytest.raises(ValueError, match="names 2 classes"):
        VGG11(num_classes=3, classes=["a", "b"])


# ----------------------------------------------------------------------------- the regularizers
@pytest.mark.parametrize("arch", ["vgg11", "resnet18"])
def test_betas_grow_with_the_depth_index_and_pair_with_thetas(arch):
    model = tiny(arch)
    rho = 0.03
    compact = variant_for(model, "compact", rho)
    assert len(compact.betas) == len(model.thetas()) and compact.alpha == rho
    L = model.depth
    assert compact.betas == pytest.approx([rho * (d - 1) / (L - 2) for d in model.conv_depths()])
    assert compact.betas[0] == 0 and max(compact.betas) == pytest.approx(rho)
    assert compact.betas[-1] == pytest.approx(rho)   # the last conv feeds the classifier
    if arch == "vgg11":    # a chain: exactly CompactNet's schedule
        assert variant_for(model, "compact", rho) == variant("compact", 9, rho)
    assert set(compact.betas) <= set(beta_schedule(L, rho))
    assert variant_for(model, "compressed", rho).betas == (0.1,) * len(model.thetas())
    assert variant_for(model, "compressed", rho).conv_term == "psi"
    assert variant_for(model, "simple", rho).betas == (0.0,) * len(model.thetas())


# ----------------------------------------------------------------------------- gradients of eq. 1
def numeric_at(f, array, indices, h):
    """Five-point differences of ``f`` at a few entries of ``array``: ``numerical_gradient``
    on one-element views of it (each C-contiguous, perturbing the array in place)."""
    flat = array.reshape(-1)
    return np.array([numerical_gradient(f, flat[i:i + 1], h, points=4)[0] for i in indices])


CHECKED = {"vgg11": ["conv1.W", "bn3.gamma", "conv5.W", "bn8.beta", "conv8.W", "classifier.W", "classifier.b"],
           "resnet18": ["conv1.W", "bn1.gamma", "layer1.0.conv2.W", "layer2.0.shortcut.conv.W",
                        "layer2.0.shortcut.bn.gamma", "layer3.1.bn1.beta", "layer4.1.conv2.W",
                        "classifier.W", "classifier.b"]}


def check_whole_network(arch, monkeypatch):
    """Eq. 1 (cross-entropy + C_W Ω + C_Θ Σ Γ_l) of a whole tiny network against five-point
    differences, float64, batch-norm in training mode: a few entries of parameters along the
    whole network (the stem, a projection, a batch norm, the classifier) and of dL/dx.

    Every parameter moves every batch-norm statistic, so a step moves all ~20,000 ReLU inputs:
    with h = 1e-4 some seeds put one across 0 (a kink, errors of 1e-3).  The test records the
    ReLU input nearest to 0 and checks it lies more than 20 steps of h = 1e-6 away; the floor
    (1e-3 of the array's largest gradient) keeps rounding noise on tiny entries out."""
    nearest = []
    relu_forward = ReLU.forward
    monkeypatch.setattr(ReLU, "forward", lambda self, x: nearest.append(float(np.abs(x).min()))
                        or relu_forward(self, x))
    model = tiny(arch, seed=0, dtype=np.float64, input_grad=True)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 3, 16, 16))
    y = np.array([0, 2, 1])
    reg = Penalty(model, variant_for(model, "compact", 0.5), cw=0.05, ctheta=0.05)
    dx = {}

    def f():
        model.zero_grad()
        scores = model.forward(x)
        loss, dscores = softmax_cross_entropy(scores, y)
        dx["x"] = model.backward(dscores)
        return loss + reg.add_gradient()

    value, h = f(), 1e-6
    assert float(value) == pytest.approx(float(objective(model, x, y, reg)[0]), rel=1e-12)
    assert min(nearest) > 20 * h, min(nearest)
    arrays = {f"{n}.{k}": (p, layer.grads[k].copy()) for n, layer in model.named_layers()
              for k, p in layer.params.items()}
    arrays["x"] = (x, dx["x"].copy())
    for name in CHECKED[arch] + ["x"]:
        p, analytic = arrays[name]
        idx = rng.choice(p.size, size=min(4, p.size), replace=False)
        numeric = numeric_at(f, p, idx, h)
        assert_gradients_close(name, analytic.reshape(-1)[idx], numeric, tol=1e-5,
                               floor=1e-3 * np.abs(analytic).max())


@pytest.mark.parametrize("arch", ["vgg11", "resnet18"])
def test_whole_network_gradient_check(arch, monkeypatch):
    check_whole_network(arch, monkeypatch)


def test_whole_network_check_catches_a_block_that_drops_its_shortcut(monkeypatch):
    def without_shortcut(self, dout):
        d = self.relu2.backward(dout)
        d = self.conv1.backward(self.bn1.backward(self.relu1.backward(self.conv2.backward(self.bn2.backward(d)))))
        return d
    monkeypatch.setattr(BasicBlock, "backward", without_shortcut)
    with pytest.raises(GradientCheckError, match="gradient of conv1.W"):
        check_whole_network("resnet18", monkeypatch)


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("arch", ["vgg11", "resnet18"])
@pytest.mark.parametrize("name, update", [("compact", "subgradient"), ("compressed", "proximal"),
                                          ("simple", "subgradient")])
def test_train_step_lowers_the_loss_with_each_regularizer(arch, name, update):
    model = tiny(arch, seed=1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((12, 3, 16, 16)).astype(np.float32)
    y = np.arange(12) % 3
    reg = Penalty(model, variant_for(model, name, 0.3), cw=1e-3, ctheta=1e-3, update=update, momentum=0.9)
    opt = SGD(model.param_layers, lr=0.05, momentum=0.9)
    losses = [float(train_step(model, opt, x, y, reg)[1]) for _ in range(10)]
    assert losses[-1] < 0.7 * losses[0], losses
    assert float(reg.last_value) > 0


def test_save_and_load_give_identical_predictions(tmp_path):
    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    for arch in ("vgg11", "resnet18"):
        model = build_architecture(ArchConfig(arch=arch, num_classes=3, width_mult=1 / 32, stem="small",
                                              levels=(1, 2) if arch == "vgg11" else None, classes=["a", "b", "c"]))
        for _ in range(2):  # move the running statistics away from their initial values
            model.forward(x)
        path = tmp_path / f"{arch}.npz"
        model.save(path)
        loaded = type(model).load(path)
        assert loaded.config == model.config
        np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
        assert model.training
    with pytest.raises(ValueError, match="holds a resnet18, not a vgg11"):
        VGG11.load(tmp_path / "resnet18.npz")
    with pytest.raises(ValueError, match="cannot use: unknown field 'arch'"):
        CompactNet.load(tmp_path / "vgg11.npz")


@pytest.mark.parametrize("change, message", [
    ({"arch": "vgg19"}, "arch must be one of"), ({"num_classes": 1}, "num_classes must be an integer >= 2"),
    ({"width_mult": "1"}, "width_mult must be"), ({"depth": 12}, "unknown field 'depth'"),
    ({"num_classes": 10**6, "width_mult": 8.0}, "declares a model of"),
    ({"levels": [1, 2]}, "ResNet18 pools globally")])
def test_from_json_refuses_a_damaged_configuration(change, message):
    d = json.loads(ArchConfig(num_classes=3).to_json())
    with pytest.raises(ValueError, match=message):
        ArchConfig.from_json(json.dumps({**d, **change}))
    assert ArchConfig.from_json(ArchConfig(arch="vgg11", levels=(1, 2)).to_json()).levels == (1, 2)


# ----------------------------------------------------------------------------- the training API
@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from minicompact.data.synthetic import make_synthetic_dataset
    return str(make_synthetic_dataset(tmp_path_factory.mktemp("photos"), num_classes=3, train_per_class=8,
                                      val_per_class=4, size=20))


@pytest.mark.parametrize("arch", ["vgg11", "resnet18"])
def test_trainer_fits_checkpoints_and_reports(arch, photos, tmp_path):
    """Trainer, checkpoints and (for VGG11, a chain of convs) the end-of-run report take the
    new networks unchanged; proximal updates as build_network picks for short runs."""
    from minicompact.objective import loss_function
    from minicompact.training import Trainer, open_images, write_report
    from minicompact.training.checkpoint import load_checkpoint
    from minicompact.training.recipe import Network
    with open_images(photos, image_size=16, batch_size=8) as images:
        config = ArchConfig(arch=arch, num_classes=3, width_mult=1 / 16, classes=images.classes,
                            stem=ArchConfig.stem_for("auto", images.crop),
                            levels=(1, 2) if arch == "vgg11" else None)
        model = build_architecture(config)
        penalty = Penalty(model, variant_for(model, "compact", 0.3), update="proximal", momentum=0.9)
        net = Network(model, SGD(model.param_layers, lr=0.02, momentum=0.9),
                      StepLR(0.02, step_size=10, warmup_epochs=1), penalty, loss_function("cross_entropy"))
        trainer = Trainer(net, images, epochs=2, out_dir=str(tmp_path), progress=False, log=lambda *a: None)
        history = trainer.fit()
        assert len(history) == 2 and all(np.isfinite(r["loss"]) for r in history)
        arrays, opt_state, state = load_checkpoint(str(tmp_path / "last.npz"))
        assert json.loads(str(arrays["__config__"]))["arch"] == arch and state["epoch"] == 2
        assert len(opt_state) == sum(len(layer.params) for layer in model.param_layers)
        x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
        np.testing.assert_array_equal(load_architecture(tmp_path / "last.npz").predict(x), model.predict(x))
        if arch == "vgg11":
            report = write_report(trainer, images.ten_crop, str(tmp_path))
            layers = report["after_threshold"]["sparsity"]["layers"]
            assert list(layers) == [f"conv{l}" for l in range(1, 9)] + ["classifier"]
            assert report["total_parameters"] == model.parameter_count()
            assert report["after_threshold"]["accuracy"]["ten_crop"]["images"] == 12
