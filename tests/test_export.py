"""ONNX export (minicompact/export.py, run.py --export): the graph computes what the model
computes, in ONNX Runtime, for dense and thinned CompactNets and for VGG11 and ResNet18 (narrowed
convs included); refusals are one line and leave no file.  Skipped when the optional
onnx/onnxruntime packages are not installed."""
import json
from dataclasses import replace

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from minicompact import export                                      # noqa: E402
from minicompact.architectures import ArchConfig, build_architecture  # noqa: E402
from minicompact.model import CompactNet, ModelConfig               # noqa: E402
from minicompact.thin import thin_model                              # noqa: E402
from test_run import TINY, main, write_folder                        # noqa: E402
from test_thin_run import kill_some                                  # noqa: E402

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


def with_statistics(m, seed=0):
    """``m`` with non-trivial batch-norm statistics and affine parameters (a fresh network's
    are 0/1: folding them would be checked by nothing), in evaluation mode."""
    rng = np.random.default_rng(seed)
    for bn in m.bns:
        bn.buffers["running_mean"][:] = 0.2 * rng.standard_normal(bn.channels)
        bn.buffers["running_var"][:] = rng.uniform(0.3, 3, bn.channels)
        bn.params["gamma"][:] = rng.uniform(0.5, 1.5, bn.channels)
        bn.params["beta"][:] = 0.2 * rng.standard_normal(bn.channels)
    return m.eval()


def trained_looking(depth, stem, seed=0):
    """A CompactNet with non-trivial batch norms (``with_statistics``), in evaluation mode."""
    return with_statistics(CompactNet(ModelConfig(depth=depth, num_classes=5, width_mult=0.1, stem=stem,
                                                  classes=list("abcde")), seed=seed), seed)


# Widths x1/16: VGG11 4..32 filters, ResNet18's stages 4, 8, 16, 32.  Narrowed: VGG11's conv3 (of
# 8) and, in ResNet18, the first conv of a projection block and of an identity block (of 8 and 16).
NARROWED = {"vgg11": [("conv3", "conv4")],
            "resnet18": [("layer2.0.conv1", "layer2.0.conv2"), ("layer3.1.conv1", "layer3.1.conv2")]}


def arch_net(arch, stem, narrowed=False, seed=0):
    """A VGG11 or ResNet18 at widths x1/16 with non-trivial batch norms; narrowed: the convs of
    ``NARROWED`` 3 filters wide (``ArchConfig.layer_widths``, as thinning leaves a network)."""
    config = ArchConfig(arch=arch, num_classes=5, width_mult=1 / 16, stem=stem, classes=list("abcde"))
    if narrowed:
        widths = {spec.name: spec.out_channels for spec in config.rule_plan()}
        widths.update({name: 3 for name, _ in NARROWED[arch]})
        config = replace(config, layer_widths=tuple(widths.values()))
    return with_statistics(build_architecture(config, seed=seed), seed)


def images(crop, n=6, batches=2, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(n, 3, crop, crop), dtype=np.uint8) for _ in range(batches)]


@pytest.mark.parametrize("depth, stem, crop", [(4, "small", 32), (3, "small", 30), (5, "imagenet", 112)],
                         ids=["small-32", "small-30-overlapping-bins", "imagenet-112"])
def test_onnx_runtime_computes_what_the_model_computes(depth, stem, crop):
    """The last feature map is 4, 4 (bins overlap where 4 does not divide 30's map) or 4 px."""
    model = trained_looking(depth, stem)
    proto = export.to_onnx(model, crop, MEAN, STD)
    got = export.compare(model, proto, images(crop), MEAN, STD)
    assert got["images"] == 12 and got["same_top1"] == 12
    assert got["max_rel_diff"] < 1e-5, got                  # float32 in another order: ~1e-6
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["classes"].split("\n") == list("abcde") and meta["crop"] == str(crop)
    assert np.allclose([float(v) for v in meta["mean"].split()], MEAN)


@pytest.mark.parametrize("arch, stem, crop, narrowed", [
    ("vgg11", "small", 32, False), ("vgg11", "small", 40, True), ("vgg11", "imagenet", 64, False),
    ("resnet18", "small", 32, True), ("resnet18", "imagenet", 64, False)],
    ids=["vgg11-small-32", "vgg11-small-40-overlapping-bins-narrowed", "vgg11-imagenet-64",
         "resnet18-small-32-narrowed", "resnet18-imagenet-64-stem-pool"])
def test_vgg11_and_resnet18_graphs_compute_what_the_model_computes(arch, stem, crop, narrowed):
    """VGG11's pyramid reads 4x4, 5x5 (overlapping bins) or 4x4 maps (the imagenet stem's four
    pools); ResNet18's global pool 4x4 or 2x2 maps (7x7/2 conv and 3x3/2 max-pool stem).  A
    narrowed conv is as narrow in the graph, and a block's conv1 narrower than its conv2."""
    model = arch_net(arch, stem, narrowed)
    proto = export.to_onnx(model, crop, MEAN, STD)
    got = export.compare(model, proto, images(crop), MEAN, STD)
    assert got["images"] == 12 and got["same_top1"] == 12
    assert got["max_rel_diff"] < 1e-5, got
    meta = {p.key: p.value for p in proto.metadata_props}
    assert (meta["network"], meta["crop"], proto.graph.name) == (arch, str(crop), arch)
    dims = {t.name: list(t.dims) for t in proto.graph.initializer}
    assert dims["classifier.W"] == [5, 32 * (21 if arch == "vgg11" else 1)]
    for name, reader in NARROWED[arch] if narrowed else ():
        assert dims[f"{name}.W"][0] == dims[f"{reader}.W"][1] == 3
    if arch == "resnet18":
        ops = [n.op_type for n in proto.graph.node]
        assert ops.count("Add") == 8 and ops.count("MaxPool") == (stem == "imagenet")
        assert dims["layer2.0.shortcut.conv.W"] == [8, 4, 1, 1] and "layer2.1.shortcut.conv.W" not in dims


def test_a_resnet18_thinned_across_its_residual_connections():
    """``thin_model`` removes channel 1 of the stream layer2 from its three writers and three
    readers, and one filter inside a block: the thin ResNet18 (explicit ``layer_widths``)
    exports as a narrower graph that computes what it computes."""
    model = arch_net("resnet18", "small")
    theta = dict(zip([s.name for s in model.config.conv_plan()], model.thetas()))
    for name in ("layer2.1.conv1", "layer3.0.conv1", "layer3.0.shortcut.conv"):
        theta[name][:, 1] = 0
    theta["layer4.1.conv1"][5] = 0
    thin, record = thin_model(model)
    assert record["removed"] == 2 and thin.config.layer_widths is not None
    proto = export.to_onnx(thin, 32, MEAN, STD)
    got = export.compare(thin, proto, images(32), MEAN, STD)
    assert got["same_top1"] == 12 and got["max_rel_diff"] < 1e-5, got
    dims = {t.name: list(t.dims) for t in proto.graph.initializer}
    assert dims["layer2.0.shortcut.conv.W"] == [7, 4, 1, 1] and dims["layer3.0.conv1.W"][1] == 7
    assert dims["layer4.1.conv1.W"][0] == 31 and dims["layer4.1.conv2.W"][1] == 31


def test_a_wrong_graph_is_caught():
    """The check is not vacuous: the classifier's regions read in the wrong order, or the
    normalisation left out, make the comparison fail by far more than its bound."""
    model = trained_looking(4, "small")
    proto = export.to_onnx(model, 32, MEAN, STD)
    W = next(t for t in proto.graph.initializer if t.name == "classifier.W")
    y, kr = W.dims
    k = model.classifier.channels
    wrong = onnx.numpy_helper.to_array(W).reshape(y, k, kr // k).transpose(0, 2, 1).reshape(y, kr)
    W.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(wrong), "classifier.W"))
    assert export.compare(model, proto, images(32), MEAN, STD)["max_rel_diff"] > 1e-2
    unnormalised = export.to_onnx(model, 32, [0, 0, 0], [1 / 255] * 3)
    assert export.compare(model, unnormalised, images(32), MEAN, STD)["max_rel_diff"] > 1e-2


@pytest.mark.parametrize("block", ["layer3.1", "layer2.0"], ids=["identity", "projection"])
def test_a_resnet_graph_without_a_shortcut_is_caught(block):
    """One block's addition replaced by its main branch alone (the shortcut left out) makes
    the comparison fail by far more than its bound."""
    model = arch_net("resnet18", "small")
    proto = export.to_onnx(model, 32, MEAN, STD)
    add = next(n for n in proto.graph.node if n.name == f"{block}.add")
    add.CopyFrom(onnx.helper.make_node("Identity", [add.input[0]], list(add.output), name=add.name))
    assert export.compare(model, proto, images(32), MEAN, STD)["max_rel_diff"] > 1e-2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run with dead structure in its model.npz, and its thinning."""
    root = tmp_path_factory.mktemp("exportrun")
    data = write_folder(root / "data")
    out = root / "run"
    assert main("--data", data, "--epochs", 1, "--out", out, *TINY) == 0
    kill_some(out / "model.npz")
    assert main("--thin", out / "model.npz", "--workers", 0) == 0
    return data, out


def one_line(capsys, *args, match):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(*args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and match in err and len(err.strip().splitlines()) == 1, err


def test_export_of_the_dense_and_the_thin_model(run, capsys):
    data, out = run
    capsys.readouterr()
    assert main("--export", out / "model.npz", "--workers", 0) == 0
    assert "the same top-1 class on 12" in capsys.readouterr().out
    dense = json.loads((out / "model-onnx.json").read_text())
    assert dense["checked_on"]["images"] == dense["checked_on"]["same_top1"] == 12 and dense["network"] == "compactnet"
    assert dense["checked_on"]["max_rel_diff"] < 1e-4
    assert main("--export", out / "thin" / "thin.npz", "--workers", 0) == 0
    thin = json.loads((out / "thin" / "thin-onnx.json").read_text())
    assert thin["checked_on"]["same_top1"] == 12
    assert thin["file_bytes"]["onnx"] < dense["file_bytes"]["onnx"]     # physically smaller
    assert thin["parameters"] < dense["parameters"]
    model = onnx.load(str(out / "thin" / "thin.onnx"))
    onnx.checker.check_model(model, full_check=True)
    convs = [t for t in model.graph.initializer if t.name == "conv1.W"]
    assert list(convs[0].dims)[0] == 3                                    # 4 filters thinned to 3


def test_export_refusals_are_one_line_and_write_nothing(run, tmp_path, capsys):
    data, out = run
    folder = tmp_path / "e"
    assert main("--export", out / "model.npz", "--out", folder, "--workers", 0) == 0
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    one_line(capsys, "--export", out / "model.npz", "--out", folder, match="already holds an export")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert main("--export", out / "model.npz", "--out", folder, "--overwrite", "--workers", 0) == 0

    (tmp_path / "notes.txt").write_text("not a model")
    one_line(capsys, "--export", tmp_path / "notes.txt", match="not a minicompact checkpoint")
    (tmp_path / "file").write_text("x")
    one_line(capsys, "--export", out / "model.npz", "--out", tmp_path / "file", match="not a folder")
    one_line(capsys, "--export", out / "model.npz", "--data", tmp_path / "nowhere", match="is not a folder")
    one_line(capsys, "--export", out / "model.npz", "--resume", out / "last.npz", match="runs alone")
    assert not (tmp_path / "notes.onnx").exists()


def test_without_onnx_the_export_says_how_to_get_it(run, monkeypatch, capsys):
    data, out = run
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)      # import onnx raises ImportError
    one_line(capsys, "--export", out / "model.npz", match='pip install "minicompact[onnx]"')


def test_export_of_a_trained_resnet18(tmp_path, capsys):
    """run.py trains a tiny ResNet18 (16 px, widths x1/16) and --export writes and checks its graph."""
    data, out = write_folder(tmp_path / "data"), tmp_path / "run"
    assert main("--data", data, "--epochs", 1, "--out", out, "--arch", "resnet18", "--image-size", 16,
                "--width-mult", 0.0625, "--batch-size", 8, "--workers", 0, "--no-progress", "--lr", 0.05,
                "--warmup", 0.5) == 0
    capsys.readouterr()
    assert main("--export", out / "model.npz", "--workers", 0) == 0
    assert "the same top-1 class on 12" in capsys.readouterr().out
    report = json.loads((out / "model-onnx.json").read_text())
    assert report["checked_on"]["images"] == report["checked_on"]["same_top1"] == 12
    assert report["checked_on"]["max_rel_diff"] < 1e-4 and (report["crop"], report["network"]) == (16, "resnet18")
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.name == "resnet18" and [n.op_type for n in model.graph.node].count("Add") == 8
