"""run.py end to end on a tiny generated image-folder dataset: train, resume, evaluate, errors."""
import json
import os
import signal

import numpy as np
import pytest
from PIL import Image

import run

CLASSES = ("blue", "green", "red")
TINY = ["--depth", "3", "--width-mult", "0.03", "--image-size", "16", "--batch-size", "8",
        "--workers", "0", "--no-progress", "--lr", "0.05", "--warmup", "0.5", "--lr-step", "5"]


def write_folder(root, train=8, val=4, size=20, classes=CLASSES, seed=0):
    """ROOT/{train,val}/<class>/*.jpg: one colour per class plus noise (learnable, tiny)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
                img[..., c % 3] += 150
                Image.fromarray(img).save(d / f"{i:03d}.jpg", quality=95)
    return root


@pytest.fixture
def data(tmp_path):
    return write_folder(tmp_path / "data")


def main(*args):
    return run.main([str(a) for a in args])


def read_log(out):
    with open(out / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def arrays(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files if k not in ("__train__",)}


def test_train_two_epochs_writes_everything(data, tmp_path):
    out = tmp_path / "out"
    assert main("--data", data, "--epochs", 2, "--out", out, *TINY) == 0
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2]
    for key in ("loss", "train_top1", "train_top5", "val_top1", "val_top5", "lr", "images_per_s", "skipped"):
        assert key in log[0]
    for name in ("last.npz", "best.npz", "model.npz", "report.json", "curves.png", "sparsity.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    acc = report["after_threshold"]["accuracy"]
    assert set(acc) == {"single_crop", "ten_crop"}
    assert acc["ten_crop"]["images"] == acc["single_crop"]["images"] == 12
    for stage in ("before_threshold", "after_threshold"):
        sp = report[stage]["sparsity"]
        assert list(sp["layers"]) == ["conv1", "conv2", "classifier"]
        for m in sp["layers"].values():
            assert {"dictionary_sparsity", "average_compactness", "layer_sparsity"} <= set(m)
        assert sp["effective_parameters"]["structural"] <= sp["effective_parameters"]["nonzero"]


def test_resume_from_first_checkpoint_is_bit_identical(data, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    # The default group scale depends on the run's planned length (group_scale.py), and a resumed
    # run keeps its own: pin it, so that "1 epoch, then extended to 2" is the same run as "2".
    pinned = ("--group-scale", 300)
    assert main("--data", data, "--epochs", 2, "--out", a, *pinned, *TINY) == 0
    assert main("--data", data, "--epochs", 1, "--out", b, *pinned, *TINY) == 0
    capsys.readouterr()
    assert main("--resume", b / "last.npz", "--epochs", 2, "--workers", 0, "--no-progress") == 0
    assert "run.py: trained epoch 2 in" in capsys.readouterr().out  # not "2 epochs": it trained one
    wa, wb = arrays(a / "last.npz"), arrays(b / "last.npz")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    same = ("epoch", "loss", "objective", "train_top1", "val_top1", "val_loss", "lr")
    assert [[r[k] for k in same] for r in read_log(a)] == [[r[k] for k in same] for r in read_log(b)]


def test_checkpoint_from_before_the_strength_rule_resumes_as_it_was_trained(data, tmp_path, capsys):
    # A checkpoint whose settings have no group_scale and no reg_update (run.py before the
    # run-length rule) trained eq. 1 as written with subgradient steps: it resumes so, and a
    # typed --group-scale is refused with a note (it used to reach Penalty as a bare float).
    out = tmp_path / "a"
    assert main("--data", data, "--epochs", 1, "--out", out, *TINY) == 0
    z = dict(np.load(out / "last.npz"))
    state = json.loads(str(z["__train__"]))
    for key in ("group_scale", "reg_update"):
        del state["settings"][key]
    z["__train__"] = np.array(json.dumps(state))
    np.savez(out / "old.npz", **z)
    capsys.readouterr()
    assert main("--resume", out / "old.npz", "--epochs", 2, "--group-scale", 5, "--workers", 0,
                "--no-progress") == 0
    cap = capsys.readouterr()
    said = cap.out + cap.err
    assert "--group-scale 5.0 ignored" in said and "trained before the flag existed" in said
    assert "regularization:" not in said                     # no rule applied on resume
    settings = json.loads(str(np.load(out / "last.npz")["__train__"]))["settings"]
    assert settings["group_scale"] is None and settings["reg_update"] == "subgradient"


def test_ctrl_c_mid_epoch_writes_checkpoint_and_resumes_exactly(data, tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main("--data", data, "--epochs", 2, "--out", a, *TINY) == 0
    from minicompact import optim
    real_step, calls = optim.SGD.step, []

    def step_then_interrupt(self):
        real_step(self)
        calls.append(1)
        if len(calls) == 4:  # in the middle of epoch 2 (3 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(optim.SGD, "step", step_then_interrupt)
    assert main("--data", data, "--epochs", 2, "--out", b, *TINY) == 130
    monkeypatch.setattr(optim.SGD, "step", real_step)
    state = json.loads(str(np.load(b / "last.npz")["__train__"]))
    assert (state["epoch"], state["step"]) == (1, 1)
    assert main("--resume", b / "last.npz", "--workers", 0, "--no-progress") == 0
    wa, wb = arrays(a / "last.npz"), arrays(b / "last.npz")
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def test_evaluate_only_from_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main("--data", data, "--epochs", 1, "--out", out, *TINY) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main("--evaluate", out / "last.npz", "--workers", 0, "--no-progress") == 0
    assert "ten crops" in capsys.readouterr().out
    evaluated = out / "eval-last"
    assert sorted(p.name for p in evaluated.iterdir()) == ["curves.png", "model.npz", "report.json",
                                                           "sparsity.png"]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # run untouched
    assert len(read_log(out)) == 1  # no training happened


def test_unreadable_images_are_skipped_and_counted(data, tmp_path):
    bad = data / "train" / "red"
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.png").write_text("not an image")
    good = (bad / "000.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (bad / "notes.txt").write_text("ignored: not an image extension")
    (bad / ".hidden.jpg").write_bytes(b"ignored: hidden")
    out = tmp_path / "out"
    with pytest.warns(UserWarning):
        assert main("--data", data, "--epochs", 1, "--out", out, *TINY) == 0
    assert read_log(out)[0]["skipped"] >= 2  # empty and text always fail; truncated may decode


def _expect_error(capsys, *args, match):
    with pytest.raises(SystemExit) as exc:
        main(*args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("run.py: error:"), err
    assert match in err, err


@pytest.mark.parametrize("args, match", [
    (["--rho", "-0.1"], "--rho"), (["--rho", "2"], "--rho"), (["--depth", "1"], "--depth"),
    (["--epochs", "0"], "--epochs"), (["--lr", "0"], "--lr"), (["--batch-size", "0"], "--batch-size"),
    (["--width-mult", "0"], "--width-mult"), (["--image-size", "4"], "--image-size"),
    (["--momentum", "1"], "--momentum"), (["--data", "/no/such/folder"], "not a folder"),
    (["--resume", "/no/such.npz"], "does not exist"),
    (["--image-size", "32", "--stem", "imagenet", "--depth", "12"], "pyramid")])
def test_cli_errors_are_one_line(args, match, capsys):
    _expect_error(capsys, *args, match=match)


def test_unreadable_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_text("garbage")
    _expect_error(capsys, "--evaluate", bad, match="not an .npz archive")


def test_bad_folders_are_one_line_errors(tmp_path, capsys):
    flat = write_folder(tmp_path / "flat")
    for p in (flat / "val").rglob("*.jpg"):
        p.rename(flat / "val" / f"{p.parent.name}-{p.name}")
    for d in (flat / "val").iterdir():
        if d.is_dir():
            d.rmdir()
    _expect_error(capsys, "--data", flat, *TINY, match="val")
    other = write_folder(tmp_path / "other")
    (other / "val" / "red").rename(other / "val" / "purple")
    _expect_error(capsys, "--data", other, *TINY, match="purple")
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    _expect_error(capsys, "--data", empty, *TINY, match="train")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main("--data", data, "--epochs", 1, "--out", out, *TINY) == 0
    good = arrays(out / "last.npz")
    from minicompact import losses

    def nan_loss(scores, labels):
        loss, d = real(scores, labels)
        return float("nan"), d

    real = losses.softmax_cross_entropy
    monkeypatch.setattr(losses, "softmax_cross_entropy", nan_loss)
    assert main("--resume", out / "last.npz", "--epochs", 2, "--workers", 0, "--no-progress") == 1
    assert "loss became nan" in capsys.readouterr().err
    for k, v in arrays(out / "last.npz").items():
        np.testing.assert_array_equal(v, good[k])


@pytest.mark.parametrize("then, where", [("epoch end", "after epoch 2"), ("Ctrl-C", "at epoch 2, step 2")])
def test_weights_diverged_by_the_last_update_are_never_checkpointed(data, tmp_path, monkeypatch, capsys,
                                                                    then, where):
    """A step's loss is computed before its update, so an update that overflows the weights
    leaves every summed loss finite: last.npz was overwritten by the diverged model, at the
    end of the epoch or on Ctrl-C right after that update, while the run said the last good
    checkpoint was kept."""
    out = tmp_path / "out"
    assert main("--data", data, "--epochs", 1, "--out", out, *TINY) == 0
    good, log = arrays(out / "last.npz"), read_log(out)
    from minicompact import optim
    real_step, calls = optim.SGD.step, []

    def overflowing_step(self):
        real_step(self)
        calls.append(1)
        if len(calls) == (3 if then == "epoch end" else 2):  # epoch 2 has 3 steps
            self.layers[0].params["W"][...] = np.inf
            if then == "Ctrl-C":
                os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(optim.SGD, "step", overflowing_step)
    capsys.readouterr()
    with np.errstate(all="ignore"):
        assert main("--resume", out / "last.npz", "--epochs", 2, "--workers", 0, "--no-progress") == 1
    assert f"the model's weights became inf or NaN {where}" in capsys.readouterr().err
    for k, v in arrays(out / "last.npz").items():
        np.testing.assert_array_equal(v, good[k])
    assert read_log(out) == log  # the log never runs ahead of last.npz


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main("--help")
    text = capsys.readouterr().out
    for flag in ("--data", "--depth", "--rho", "--model", "--epochs", "--batch-size", "--lr", "--momentum",
                 "--lr-step", "--cw", "--ctheta", "--threshold", "--image-size", "--width-mult",
                 "--reg-update", "--device", "--workers", "--seed", "--out", "--resume", "--evaluate"):
        assert flag in text


def test_checkpoint_for_other_classes_is_a_one_line_error(data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main("--data", data, "--epochs", 1, "--out", out, *TINY) == 0
    other = write_folder(tmp_path / "other", classes=("a", "b", "c", "d"))
    _expect_error(capsys, "--evaluate", out / "last.npz", "--data", other, "--workers", 0,
                  match="does not match")


def test_precision_flag_sets_the_backend_and_is_a_no_op_on_the_cpu(data, tmp_path, capsys):
    from minicompact import backend
    previous = backend.get_precision()
    try:
        assert main("--data", data, "--epochs", 1, "--out", tmp_path / "tf32", "--precision", "tf32",
                    "--device", "cpu", *TINY) == 0
        assert backend.get_precision() == "tf32"
        assert "--precision tf32 changes nothing on the CPU" in capsys.readouterr().err
        report = json.loads((tmp_path / "tf32" / "report.json").read_text())
        assert report["settings"]["precision"] == "tf32"
    finally:
        backend.set_precision(previous)


def test_conv_algo_changes_no_maths(data, tmp_path):
    """--conv-algo winograd trains the same network: weights after an epoch agree with im2col's
    to float32 rounding, and the checkpoint holds the same arrays."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main("--data", data, "--epochs", 1, "--out", a, *TINY) == 0
    assert main("--data", data, "--epochs", 1, "--out", b, "--conv-algo", "winograd", *TINY) == 0
    wa, wb = arrays(a / "last.npz"), arrays(b / "last.npz")
    assert set(wa) == set(wb)
    for key in wa:
        if wa[key].dtype.kind == "f":
            np.testing.assert_allclose(wb[key], wa[key], rtol=1e-3, atol=1e-4, err_msg=key)
