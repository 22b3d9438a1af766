"""Transfer learning: loading a source network, the new head and its rate, frozen layers,
run.py --finetune / --features end to end on tiny generated folders, and the refusals."""
import json
import os

import numpy as np
import pytest

import run
from minicompact.data.loader import BatchLoader
from minicompact.cli.settings import Settings
from minicompact.objective import train_step
from minicompact.cli.transfer_commands import finetune_parts
from minicompact.transfer import FrozenBatchNorm2D, TransferError, extract_features, read_source
from test_run import TINY, write_folder
from test_run_safety import assert_one_line, capped_run

TARGET = ("cyan", "magenta", "yellow", "grey")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained 3-layer source run (3 classes) and a 4-class target folder."""
    base = tmp_path_factory.mktemp("transfer")
    write_folder(base / "src")
    write_folder(base / "tgt", classes=TARGET, seed=1)
    assert run.main([str(a) for a in ("--data", base / "src", "--epochs", 1, "--out", base / "pre", *TINY)]) == 0
    return base


def settings(**kw):
    s = dict(resume=None, evaluate=None, seed=0, lr=0.1, momentum=0.9, head_lr_mult=10.0, freeze=0, keep_reg=False, new_stats=False,
             model="compact", depth=3, rho=0.03, compressed_beta=0.1, cw=1e-4, ctheta=1e-4,
             reg_update="subgradient", group_scale=None)
    s.update(kw)
    return Settings(**s)


def test_source_loads_and_gets_a_new_head(source):
    src, state = read_source(source / "pre" / "model.npz")
    s = settings(finetune=str(source / "pre" / "model.npz"))
    model, opt, reg, stats = finetune_parts(s, TARGET, "cpu")
    W = model.classifier.params["W"]
    K, R = src.convs[-1].params["W"].shape[0], src.spp.num_regions
    assert W.shape == (4, K, R) and model.config.num_classes == 4 and model.config.classes == list(TARGET)
    assert 0.5 < W.std() * np.sqrt(K * R / 2) < 1.5          # N(0, 2/(R·K)) as in training
    assert not model.classifier.params["b"].any()
    for a, b in zip(model.convs + model.bns, src.convs + src.bns):
        for k in a.params:
            np.testing.assert_array_equal(a.params[k], b.params[k])
    assert reg is None and stats == (state["mean"], state["std"])   # regularizers off, source stats
    kept = finetune_parts(settings(finetune=s.finetune, keep_reg=True, new_stats=True), TARGET, "cpu")
    assert kept[2] is not None and kept[3] is None            # --keep-reg, --new-stats
    assert opt.lr_mult == [1.0] * (len(opt.layers) - 1) + [10.0]
    assert opt.layers[-1] is model.classifier


def test_head_steps_ten_times_faster(source):
    s = settings(finetune=str(source / "pre" / "model.npz"), momentum=0.0, lr=0.01)
    model, opt, _, _ = finetune_parts(s, TARGET, "cpu")
    before = {id(layer): {k: v.copy() for k, v in layer.params.items()} for layer in opt.layers}
    for layer in opt.layers:
        for k, p in layer.params.items():
            layer.grads[k] = np.ones_like(p)
    opt.step()
    for layer, mult in zip(opt.layers, opt.lr_mult):
        for k, p in layer.params.items():
            np.testing.assert_allclose(before[id(layer)][k] - p, 0.01 * mult, rtol=1e-5)


def test_frozen_layers_receive_no_update(source):
    s = settings(finetune=str(source / "pre" / "model.npz"), freeze=1, lr=0.05)
    model, opt, _, _ = finetune_parts(s, TARGET, "cpu")
    frozen = [model.convs[0], model.bns[0]]
    assert all(layer not in opt.layers for layer in frozen)
    snap = [{k: v.copy() for k, v in {**layer.params, **layer.buffers}.items()} for layer in model.param_layers]
    model.train()
    assert isinstance(model.bns[0], FrozenBatchNorm2D) and not model.bns[0].training
    assert model.bns[1].training
    x = np.random.default_rng(0).standard_normal((6, 3, 16, 16)).astype(np.float32)
    for _ in range(2):
        train_step(model, opt, x, np.arange(6) % 4)
    for layer, old in zip(model.param_layers, snap):
        moved = any(not np.array_equal(old[k], v) for k, v in {**layer.params, **layer.buffers}.items())
        assert moved == (layer not in frozen), layer


def test_features_are_the_classifier_input(source):
    from minicompact.data.folders import open_dataset
    model, state = read_source(source / "pre" / "model.npz")
    _, val = open_dataset(source / "tgt")
    with BatchLoader(val, 5, resize=18, crop=16, mode="center") as center, \
            BatchLoader(val, 3, resize=18, crop=16, mode="tencrop") as ten:
        F, y = extract_features(model, center, state["mean"], state["std"])
        T, yt = extract_features(model, ten, state["mean"], state["std"])
    K, R = model.convs[-1].params["W"].shape[0], model.spp.num_regions
    assert F.shape == (16, K * R) and T.shape == (16, 10, K * R) and F.dtype == np.float32
    assert (y == yt).all() and sorted(set(y.tolist())) == [0, 1, 2, 3]
    np.testing.assert_allclose(T[:, 4], F, rtol=1e-4, atol=1e-5)  # crop 4 is the centre crop
    W = model.classifier.params["W"].reshape(3, -1)
    from minicompact.data.transforms import normalize
    x = normalize(next(iter(center.epoch(0)))[0], state["mean"], state["std"])
    np.testing.assert_allclose(model.predict(x), F[:5] @ W.T + model.classifier.params["b"], rtol=1e-4, atol=1e-4)


def test_finetune_run_end_to_end_and_resume(source, tmp_path):
    out = tmp_path / "ft"
    args = ["--finetune", source / "pre" / "model.npz", "--data", source / "tgt", "--freeze", 1,
            "--epochs", 1, "--out", out, *TINY]
    assert run.main([str(a) for a in args]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["finetune"].endswith("model.npz") and report["settings"]["freeze"] == 1
    with np.load(out / "last.npz") as z, np.load(source / "pre" / "model.npz") as src:
        assert z["classifier.W"].shape[0] == 4
        for k in ("conv1.W", "bn1.gamma", "bn1.running_mean", "bn1.running_var"):
            np.testing.assert_array_equal(z[k], src[k])
        assert not np.array_equal(z["conv2.W"], src["conv2.W"])
    assert run.main(["--resume", str(out / "last.npz"), "--epochs", "2", "--workers", "0", "--no-progress"]) == 0
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


def test_features_run_end_to_end(source, tmp_path, capsys):
    out = tmp_path / "feat"
    args = ["--features", source / "pre" / "model.npz", "--data", source / "tgt", "--out", out, "--workers", 0]
    assert run.main([str(a) for a in args]) == 0
    report = json.loads((out / "features.json").read_text())
    assert report["classes"] == sorted(TARGET) and report["train_images"] == 32 and report["val_images"] == 16
    for loss in ("svm", "softmax"):
        c = report["classifiers"][loss]
        assert set(c) >= {"lambda", "held_out_top1_error", "single_crop", "ten_crop"}
        assert c["single_crop"]["top1_error"] < 75.0     # chance: 75 % error; colours are easy
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run.main([str(a) for a in args])
    assert exc.value.code == 2 and "already holds a features run (features.json)" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["not-a-model", "one-class", "freeze", "features-not-a-model",
                                  "features-one-image-per-class"])
def test_bad_input_is_one_line_before_work(source, tmp_path, capsys, case):
    ckpt = source / "pre" / "model.npz"
    data = source / "tgt"
    if case in ("not-a-model", "features-not-a-model"):
        ckpt = tmp_path / "weights.npz"
        np.savez(ckpt, w=np.zeros(3))
    if case == "one-class":
        data = write_folder(tmp_path / "one", classes=("only",))
    if case == "features-one-image-per-class":  # nothing left to hold out to choose lambda
        data = write_folder(tmp_path / "few", train=1, classes=TARGET)
    flag = "--features" if case.startswith("features") else "--finetune"
    extra = ["--freeze", 3] if case == "freeze" else []
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run.main([str(a) for a in (flag, ckpt, "--data", data, "--out", tmp_path / "out", *extra, *TINY)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("run.py: error:"), err
    assert {"not-a-model": "not a minicompact checkpoint", "features-not-a-model": "not a minicompact checkpoint",
            "one-class": "1 class", "freeze": "beyond the depth",
            "features-one-image-per-class": "needs at least 2 training images per class"}[case] in err
    assert not (tmp_path / "out").exists()


def test_read_source_refuses_a_checkpoint_without_a_loadable_model(tmp_path):
    from minicompact.model import CompactNet
    m = CompactNet(depth=3, num_classes=3, width_mult=0.03, stem="small")
    arrays = m.state_arrays()
    arrays["__config__"] = np.array(m.config.to_json())
    arrays["conv1.W"] = arrays["conv1.W"][:1]                # a shape its configuration does not build
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(TransferError, match=r"conv1.W: expected shape \(\d+, 3, 7, 7\), saved \(1, 3"):
        read_source(tmp_path / "bad.npz")


def test_finetune_flags_without_finetune_are_refused(source, tmp_path, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run.main([str(a) for a in ("--data", source / "tgt", "--freeze", 1, "--out", tmp_path / "out", *TINY)])
    assert exc.value.code == 2 and "go with --finetune" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--features", "--finetune"])
def test_image_size_bound_holds_for_transfer_runs(source, tmp_path, flag):
    """Issue 26: one line, exit 2, before any image is resized (not a MemoryError in Pillow)."""
    proc = capped_run([flag, source / "pre" / "model.npz", "--data", source / "tgt", "--workers", 0,
                       "--epochs", 1, "--image-size", 100000], cwd=tmp_path)
    assert_one_line(proc, "--image-size: image size 100000 is above 2048 px")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("out", ["default", "new", "users"])
def test_features_stopped_midway_leaves_no_folder(source, tmp_path, monkeypatch, capsys, out):
    """Issue 26: Ctrl-C (or an error) in --features removes the folder it created, or only its
    own files from a folder the user already had."""
    import minicompact.transfer as transfer

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(transfer, "fit_linear", ctrl_c)
    monkeypatch.chdir(tmp_path)
    target = {"default": None, "new": tmp_path / "new", "users": tmp_path / "mine"}[out]
    if out == "users":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    args = ["--features", source / "pre" / "model.npz", "--data", source / "tgt", "--workers", 0, "--cache"]
    assert run.main([str(a) for a in args + (["--out", target] if target else [])]) == 130
    assert "stopped by SIGINT" in capsys.readouterr().err
    if out == "users":
        assert sorted(os.listdir(target)) == ["cache", "notes.txt"]  # the cache belongs to no run
    else:  # runs/ itself may stay: it is where runs go
        assert os.listdir(tmp_path / "runs" if out == "default" else tmp_path) == []
