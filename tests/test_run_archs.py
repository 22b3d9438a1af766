"""run.py --arch vgg11|resnet18 (issue 30, step 2): VGG11_CC and ResNet18_CC through run.py, the
training API and the sweep; the dead structure of residual streams (``graph_metrics``); --thin
across residual connections and what takes a thin network; refusals, each in one line."""
import csv
import importlib.util
import json

import numpy as np
import pytest

from minicompact.architectures import ArchConfig, build_architecture, load_model
from minicompact.graph_metrics import alive_in_graph, graph_effective_parameters, network_sparsity
from minicompact.metrics import alive_channels, effective_parameters
from minicompact.sweep import command as sweep
from test_run import _expect_error, arrays, main, read_log, write_folder

# Widths ×1/16 (VGG11 4..32 filters, ResNet18 4..32); VGG11's pyramid (1, 2, 4) needs 32-px crops
# (three 2×2 pools with the small stem), ResNet18 runs on 16 px.
FLAGS = ["--width-mult", "0.0625", "--batch-size", "8", "--workers", "0", "--no-progress", "--lr", "0.05",
         "--warmup", "0.5", "--lr-step", "5"]
SIZE = {"vgg11": 32, "resnet18": 16}


def tiny(arch):
    return ["--arch", arch, "--image-size", SIZE[arch], *FLAGS]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("archs") / "data")


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Per arch, a 2-epoch run ("whole") and a 1-epoch run resumed to 2 ("resumed")."""
    base, out = tmp_path_factory.mktemp("runs"), {}
    pinned = ("--group-scale", 300)  # the run-length rule would differ between 1 and 2 planned epochs
    for arch in SIZE:
        whole, resumed = base / f"{arch}-whole", base / f"{arch}-resumed"
        assert main("--data", data, "--epochs", 2, "--out", whole, *pinned, *tiny(arch)) == 0
        assert main("--data", data, "--epochs", 1, "--out", resumed, *pinned, *tiny(arch)) == 0
        assert main("--resume", resumed / "last.npz", "--epochs", 2, "--workers", 0, "--no-progress") == 0
        out[arch] = whole, resumed
    return out


# ----------------------------------------------------------------------------- run.py
@pytest.mark.parametrize("arch", list(SIZE))
def test_trains_resumes_bit_identically_and_reports(arch, runs):
    whole, resumed = runs[arch]
    a, b = arrays(whole / "last.npz"), arrays(resumed / "last.npz")
    assert a.keys() == b.keys() and json.loads(str(a["__config__"]))["arch"] == arch
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    same = ("epoch", "loss", "objective", "train_top1", "val_top1", "val_loss", "lr")
    assert [[r[k] for k in same] for r in read_log(whole)] == [[r[k] for k in same] for r in read_log(resumed)]

    report = json.loads((whole / "report.json").read_text())
    model = load_model(whole / "model.npz")
    names = [n for n, _ in model.named_layers() if n.startswith(("conv", "layer"))
             and not n.rpartition(".")[2].startswith("bn")]
    assert (report["arch"], report["depth"], report["settings"]["arch"]) == (arch, model.config.depth, arch)
    for stage in ("before_threshold", "after_threshold"):
        sp = report[stage]["sparsity"]
        assert list(sp["layers"]) == names + ["classifier"]   # named as named_layers names them
        eff = sp["effective_parameters"]
        assert eff["structural"] <= eff["nonzero"] <= eff["total"] == model.parameter_count()
    assert report["after_threshold"]["sparsity"] == network_sparsity(model)
    assert report["after_threshold"]["accuracy"]["ten_crop"]["images"] == 12


@pytest.mark.parametrize("arch", list(SIZE))
def test_evaluate_reproduces_the_report(arch, runs, tmp_path, capsys):
    whole, _ = runs[arch]
    capsys.readouterr()
    assert main("--evaluate", whole / "last.npz", "--out", tmp_path / "eval", "--workers", 0, "--no-progress") == 0
    said = capsys.readouterr().out
    assert f"results ({arch} with compactnet's regularizers, depth" in said and "layer sparsity" in said
    run, evaluated = (json.loads((p / "report.json").read_text()) for p in (whole, tmp_path / "eval"))
    for stage in ("before_threshold", "after_threshold"):
        assert evaluated[stage] == run[stage], stage


def test_depth_is_ignored_with_a_note_and_names_the_default_folder(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main("--data", data, "--epochs", 1, "--depth", 5, *tiny("resnet18")) == 0
    err = capsys.readouterr().err
    assert "--depth 5 ignored: resnet18 has its own depth (L = 18)" in err
    settings = json.loads(str(np.load(tmp_path / "runs" / "resnet18-compact-rho0.03" / "last.npz")["__train__"]))
    assert (settings["settings"]["arch"], settings["settings"]["depth"]) == ("resnet18", 18)


def test_refusals_are_one_line(runs, data, tmp_path, capsys):
    whole = runs["resnet18"][0]
    _expect_error(capsys, "--resume", whole / "last.npz", "--arch", "vgg11", "--epochs", 3,
                  match="holds a resnet18; --arch vgg11 cannot resume it")
    _expect_error(capsys, "--evaluate", whole / "last.npz", "--arch", "compactnet",
                  match="holds a resnet18; --arch compactnet cannot evaluate it")
    _expect_error(capsys, "--data", data, "--arch", "vgg11", "--image-size", 16,
                  match="leaves 2x2 feature maps before the spatial pyramid of vgg11")
    _expect_error(capsys, "--arch", "resnet50", match="invalid choice: 'resnet50'")
    z = dict(np.load(whole / "last.npz"))
    z["__config__"] = np.array(json.dumps({**json.loads(str(z["__config__"])), "arch": "resnet50"}))
    np.savez(tmp_path / "unknown.npz", **z)
    for command in ("--evaluate", "--resume", "--thin", "--features"):
        extra = ("--data", data) if command == "--features" else ()
        _expect_error(capsys, command, tmp_path / "unknown.npz", *extra, match="arch must be one of")


# Dead structure put into a run's model file: in the ResNet, channel 1 of the stream layer1 read
# by no conv (coupled: it goes from the stem, both blocks' conv2 and four readers at once) and
# filter 0 of layer3.0.conv1 (free: it goes alone); in VGG11, conv3's filter 0.
KILLED = {"resnet18": {"layer1.0.conv1.W": (slice(None), 1), "layer1.1.conv1.W": (slice(None), 1),
                       "layer2.0.conv1.W": (slice(None), 1), "layer2.0.shortcut.conv.W": (slice(None), 1),
                       "layer3.0.conv1.W": (0,)},
          "vgg11": {"conv3.W": (0,)}}
THINNED = {"resnet18": [3, 4, 3, 4, 3, 8, 8, 8, 8, 8, 15, 16, 16, 16, 16, 32, 32, 32, 32, 32],
           "vgg11": [4, 8, 15, 16, 32, 32, 32, 32]}


@pytest.mark.parametrize("arch", list(SIZE))
def test_thin_writes_a_narrower_network_that_evaluates_resumes_and_finetunes(arch, runs, data, tmp_path, capsys):
    source = tmp_path / "run"
    source.mkdir()
    z = dict(np.load(runs[arch][0] / "model.npz"))
    for key, index in KILLED[arch].items():
        z[key][index] = 0
    np.savez(source / "model.npz", **z)
    np.savez(source / "last.npz", **dict(np.load(runs[arch][0] / "last.npz")))
    capsys.readouterr()
    assert main("--thin", source / "model.npz", "--workers", 0) == 0
    printed = capsys.readouterr().out
    assert f"-> {THINNED[arch]}" in printed and "compact convs" not in printed
    report = json.loads((source / "thin" / "thin-report.json").read_text())
    assert report["widths_after"] == THINNED[arch] and report["compact_convs"] == []
    assert report["accuracy"]["single_crop"]["same_prediction"] >= 0.9     # borders only
    thin_path = source / "thin" / "thin.npz"
    thin = load_model(thin_path)
    assert list(thin.config.layer_widths) == THINNED[arch] and thin.parameter_count() == report["params_after"]
    assert main("--evaluate", thin_path, "--workers", 0, "--no-progress") == 0
    evaluated = json.loads((source / "thin" / "eval-thin" / "report.json").read_text())
    assert evaluated["total_parameters"] == report["params_after"]
    assert main("--resume", thin_path, "--epochs", 3, "--workers", 0, "--no-progress") == 0
    assert list(load_model(source / "thin" / "last.npz").config.layer_widths) == THINNED[arch]
    tuned = tmp_path / "ft"
    assert main("--finetune", thin_path, "--data", data, "--epochs", 1, "--out", tuned, *FLAGS) == 0
    assert list(load_model(tuned / "model.npz").config.layer_widths) == THINNED[arch]
    capsys.readouterr()
    assert main("--thin", thin_path, "--workers", 0) == 0                    # a fixed point
    assert "nothing to remove" in capsys.readouterr().out
    if arch == "resnet18":            # a dead filter alone in its residual channel removes nothing
        z = dict(np.load(runs[arch][0] / "model.npz"))
        z["layer1.0.conv2.W"][1] = 0
        np.savez(tmp_path / "one-dead.npz", **z)
        assert main("--thin", tmp_path / "one-dead.npz", "--workers", 0) == 0
        said = capsys.readouterr().out
        assert "nothing to remove" in said and "other convs keep alive: 1;" in said
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        assert main("--export", thin_path, "--workers", 0) == 0              # checked by ONNX Runtime
        assert (source / "thin" / "thin.onnx").is_file()


def test_features_and_finetune_take_resnet18(runs, data, tmp_path, capsys):
    source = runs["resnet18"][0] / "model.npz"
    assert main("--features", source, "--data", data, "--out", tmp_path / "f", "--workers", 0) == 0
    features = json.loads((tmp_path / "f" / "features.json").read_text())
    assert features["feature_size"] == 32   # the global pool's 32 maps, R = 1
    out = tmp_path / "ft"
    assert main("--finetune", source, "--data", data, "--epochs", 1, "--freeze", 3, "--lr", 0.01,
                "--warmup", 0, "--out", out, "--workers", 0, "--no-progress") == 0
    settings = json.loads(str(np.load(out / "last.npz")["__train__"]))["settings"]
    assert (settings["arch"], settings["freeze"]) == ("resnet18", 3)
    tuned, src = load_model(out / "last.npz"), load_model(source)   # model.npz is thresholded
    for name in ("conv1", "layer1.0.conv1", "layer1.0.conv2"):   # the first 3 convs, frozen
        np.testing.assert_array_equal(dict(tuned.named_layers())[name].params["W"],
                                      dict(src.named_layers())[name].params["W"])
    assert main("--resume", out / "last.npz", "--epochs", 2, "--workers", 0, "--no-progress") == 0
    assert main("--finetune", source, "--data", data, "--epochs", 1, "--keep-reg", "--lr", 0.01, "--warmup", 0,
                "--out", tmp_path / "reg", "--workers", 0, "--no-progress") == 0   # variant_for's betas
    _expect_error(capsys, "--finetune", source, "--data", data, "--freeze", 21, match="--freeze 0 to 20")


def test_build_network_takes_an_arch(data):
    """The notebook's calls: build_network(arch=...) → Trainer → write_report."""
    from minicompact.training import Trainer, build_network, open_images, write_report
    with open_images(str(data), image_size=16, batch_size=8) as images:
        net = build_network(images, arch="resnet18", rho=0.1, width_mult=1 / 16, epochs=1, lr=0.05, warmup=0)
        assert net.model.config.arch == "resnet18" and len(net.penalty.config.betas) == 20
        trainer = Trainer(net, images, epochs=1, progress=False, log=lambda *a: None)
        trainer.fit()
        report = write_report(trainer, images.ten_crop, None)
    assert "layer4.1.conv2" in report["after_threshold"]["sparsity"]["layers"]
    thin = build_network(images, arch="vgg11", width_mult=1 / 16, layer_widths=[4, 8, 15, 16, 32, 32, 32, 31])
    assert [c.out_channels for c in thin.model.convs] == [4, 8, 15, 16, 32, 32, 32, 31]   # a thinned VGG11's
    with pytest.raises(ValueError, match="layer_widths must be 8 integers"):
        build_network(images, arch="vgg11", layer_widths=[4] * 7)


# ----------------------------------------------------------------------------- dead structure
def random_sparse(shape, rng, zero_filters=0.2, zero_groups=0.4):
    t = rng.standard_normal(shape)
    t[rng.random(shape[0]) < zero_filters] = 0
    t[rng.random(shape[:2]) < zero_groups] = 0
    return t


def test_on_a_chain_the_graph_count_is_the_chain_count():
    """VGG11's channel spaces are a chain: alive_in_graph is metrics.alive_channels there."""
    config = ArchConfig(arch="vgg11", num_classes=4, width_mult=1 / 32, stem="small")
    edges, head = config.channel_spaces()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        thetas = [random_sparse((s.out_channels, s.in_channels, 3, 3), rng) for s in config.conv_plan()]
        W = random_sparse((4, thetas[-1].shape[0], config.regions), rng, 0.1, 0.5)
        filters, spaces = alive_in_graph(thetas, edges, W, head)
        for got, want in zip(filters, alive_channels(thetas, W)):
            np.testing.assert_array_equal(got, want)
        assert graph_effective_parameters(thetas, edges, W, head, 4) == effective_parameters(thetas, W, 4)


def resnet(seed=0):
    model = build_architecture(ArchConfig(arch="resnet18", num_classes=3, width_mult=1 / 16, stem="small"),
                               seed=seed)
    return model, dict(model.named_layers())


def alive(model):
    edges, head = model.config.channel_spaces()
    filters, spaces = alive_in_graph(model.thetas(), edges, model.classifier.params["W"], head)
    names = [spec.name for spec in model.config.conv_plan()]
    return dict(zip(names, filters)), spaces


def test_a_stream_channel_lives_while_any_block_or_class_reads_it():
    model, layer = resnet()
    c = 5
    model.classifier.params["W"][:, c] = 0               # no class reads channel 5 of layer4's stream ...
    filters, spaces = alive(model)
    assert spaces["layer4"][c] and filters["layer4.0.conv2"][c]   # ... but layer4.1's conv1 does
    layer["layer4.1.conv1"].params["W"][:, c] = 0        # now nothing reads it
    filters, spaces = alive(model)
    assert not spaces["layer4"][c] and spaces["layer4"].sum() == 31
    for writer in ("layer4.0.conv2", "layer4.0.shortcut.conv", "layer4.1.conv2"):
        assert not filters[writer][c] and filters[writer].sum() == 31, writer
    eff = network_sparsity(model)["effective_parameters"]
    assert eff["alive_channels"][-1] == 31 and eff["structural"] < eff["nonzero"]


def test_inside_a_block_channels_die_as_in_a_chain_and_a_stream_channel_needs_a_writer():
    model, layer = resnet()
    layer["layer2.1.conv2"].params["W"][:, 3] = 0        # conv1's map 3 of block layer2.1 is unread
    filters, spaces = alive(model)
    assert not filters["layer2.1.conv1"][3] and filters["layer2.1.conv1"].sum() == 7
    assert spaces["layer2"].all()                          # the stream is untouched
    for writer in ("conv1", "layer1.0.conv2", "layer1.1.conv2"):   # every writer of layer1's channel 2
        layer[writer].params["W"][2] = 0
    filters, spaces = alive(model)
    assert not spaces["layer1"][2] and spaces["layer1"].sum() == 3
    layer["layer1.1.conv2"].params["W"][2, 0, 1, 1] = 1.0  # one writer moves it again
    assert alive(model)[1]["layer1"][2]


# ----------------------------------------------------------------------------- the sweep
def test_a_sweep_over_two_archs(data, tmp_path, capsys):
    out = tmp_path / "sweep"
    run = ["--width-mult", "0.0625", "--image-size", "16", "--batch-size", "8", "--workers", "0",
           "--lr", "0.05", "--warmup", "0.5", "--lr-step", "5", "--epochs", "1", "--data", str(data)]
    assert sweep.main(["--out", str(out), "--archs", "compactnet,resnet18", "--depths", "3", "--rhos", "0.03",
                       "--", *run]) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["point"], r["arch"], r["depth"]) for r in rows] == [
        ("compact-d3-rho0.03", "compactnet", "3"), ("resnet18-compact-rho0.03", "resnet18", "18")]
    log = (out / "logs" / "resnet18-compact-rho0.03.log").read_text()
    assert "--arch resnet18 --model compact --rho 0.03" in log and "--depth" not in log.splitlines()[0]
    assert "--arch" not in (out / "logs" / "compact-d3-rho0.03.log").read_text().splitlines()[0]
    assert "resnet18-compact" in (out / "summary.md").read_text()
    capsys.readouterr()
    assert sweep.main(["--out", str(tmp_path / "x"), "--archs", "resnet50", "--", *run]) == 2
    assert "--archs: unknown arch 'resnet50'" in capsys.readouterr().err
