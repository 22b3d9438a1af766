"""ONNX export (minicompact/export.py, run.py --export): the graph computes what the model
computes, in ONNX Runtime, for dense and thinned networks; refusals are one line and leave no
file.  Skipped when the optional onnx/onnxruntime packages are not installed."""
import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from minicompact import export                                      # noqa: E402
from minicompact.model import CompactNet, ModelConfig               # noqa: E402
from test_run import TINY, main, write_folder                        # noqa: E402
from test_thin_run import kill_some                                  # noqa: E402

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


def trained_looking(depth, stem, seed=0):
    """A CompactNet whose batch norms hold non-trivial statistics and affine parameters (a
    fresh one's are 0/1: folding them would be checked by nothing), in evaluation mode."""
    m = CompactNet(ModelConfig(depth=depth, num_classes=5, width_mult=0.1, stem=stem, classes=list("abcde")),
                   seed=seed)
    rng = np.random.default_rng(seed)
    for bn in m.bns:
        bn.buffers["running_mean"][:] = 0.2 * rng.standard_normal(bn.channels)
        bn.buffers["running_var"][:] = rng.uniform(0.3, 3, bn.channels)
        bn.params["gamma"][:] = rng.uniform(0.5, 1.5, bn.channels)
        bn.params["beta"][:] = 0.2 * rng.standard_normal(bn.channels)
    return m.eval()


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
    assert dense["checked_on"]["images"] == dense["checked_on"]["same_top1"] == 12
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
