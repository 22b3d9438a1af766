"""run.py --thin end to end: the files it writes, what the thin model is accepted by
(--evaluate, a fine-tune via --resume, --thin again), and the refusals (one line, no file)."""
import json
import os

import numpy as np
import pytest

from minicompact.system.npz import atomic_savez
from minicompact.model import CompactNet
from test_run import TINY, main, write_folder


def kill_some(path, conv1_filters=(1,), maps=(0,)):
    """Rewrite a run's model file with some dead structure: all-zero conv1 filters (a constant
    map, folded) and last-layer maps no class reads."""
    with np.load(path) as z:
        a = {k: z[k] for k in z.files}
    a["conv1.W"][list(conv1_filters)] = 0
    a["classifier.W"][:, list(maps)] = 0
    atomic_savez(path, a)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run (depth 3: 4 and 8 filters), one epoch, with dead structure put into its
    model.npz; returns (data root, run folder)."""
    root = tmp_path_factory.mktemp("thinrun")
    data = write_folder(root / "data")
    out = root / "run"
    assert main("--data", data, "--epochs", 1, "--out", out, *TINY) == 0
    kill_some(out / "model.npz")
    return data, out


def test_thin_writes_its_files_and_report(trained, capsys):
    data, out = trained
    capsys.readouterr()
    assert main("--thin", out / "model.npz", "--workers", 0) == 0
    printed = capsys.readouterr().out
    folder = out / "thin"
    assert sorted(p.name for p in folder.iterdir()) == ["thin-report.json", "thin.npz"]
    assert "widths [4, 8] -> [3, 7]" in printed
    r = json.loads((folder / "thin-report.json").read_text())
    assert r["widths_before"] == [4, 8] and r["widths_after"] == [3, 7]
    assert r["params_after"] < r["params_before"]
    for crops in ("single_crop", "ten_crop"):
        acc = r["accuracy"][crops]
        assert acc["images"] == 12 and {"dense", "thin", "same_prediction"} <= set(acc)
        assert acc["same_prediction"] >= 0.9                  # measured: borders only
    assert {"dense", "thin", "thin_compact"} == set(r["speed"]["images_per_s"])
    assert [c["layer"] for c in r["compact_convs"]] == ["conv1", "conv2"]
    assert r["file_bytes"]["thin"] < r["file_bytes"]["dense"]
    thin = CompactNet.load(folder / "thin.npz")
    assert thin.config.layer_widths == (3, 7)

    # A second thinning of the same file goes to thin-2: never over the first.
    assert main("--thin", out / "model.npz", "--workers", 0) == 0
    assert (out / "thin-2" / "thin.npz").is_file()


def test_thin_model_is_accepted_by_evaluate_resume_and_thin(trained, capsys):
    data, out = trained
    folder = out / "thin-accept"
    assert main("--thin", out / "model.npz", "--workers", 0, "--out", folder) == 0
    thin = folder / "thin.npz"
    capsys.readouterr()
    # --thin again: nothing to remove, nothing written, exit 0
    assert main("--thin", thin, "--workers", 0) == 0
    assert "nothing to remove" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == ["thin-report.json", "thin.npz"]
    assert not (folder / "thin").exists()
    # --evaluate: its own report of the thin network
    assert main("--evaluate", thin, "--workers", 0, "--no-progress") == 0
    report = json.loads((folder / "eval-thin" / "report.json").read_text())
    assert report["total_parameters"] == CompactNet.load(thin).parameter_count()
    # a fine-tune: --resume continues training the thin network in its folder
    assert main("--resume", thin, "--epochs", 2, "--workers", 0, "--no-progress") == 0
    tuned = CompactNet.load(folder / "last.npz")
    assert tuned.config.layer_widths == (3, 7)
    assert json.loads((folder / "report.json").read_text())["epochs"] == 2


def test_thin_model_transfers_by_finetune_and_features(trained, tmp_path):
    """A thinned network is a source like any other: --finetune builds on its narrower layers
    (and can be resumed), --features reads its narrower pyramid."""
    data, out = trained
    folder = tmp_path / "thin"
    assert main("--thin", out / "model.npz", "--workers", 0, "--out", folder) == 0
    target = write_folder(tmp_path / "target", classes=("cyan", "magenta", "yellow"), seed=3)
    tuned = tmp_path / "ft"
    assert main("--finetune", folder / "thin.npz", "--data", target, "--epochs", 1, "--out", tuned, *TINY) == 0
    model = CompactNet.load(tuned / "model.npz")
    assert model.config.layer_widths == (3, 7) and model.classifier.params["W"].shape[:2] == (3, 7)
    assert main("--resume", tuned / "last.npz", "--epochs", 2, "--workers", 0, "--no-progress") == 0
    assert main("--features", folder / "thin.npz", "--data", target, "--out", tmp_path / "feat",
                "--workers", 0) == 0
    report = json.loads((tmp_path / "feat" / "features.json").read_text())
    assert report["feature_size"] == 7 * model.spp.num_regions


def test_refusals_are_one_line_and_write_nothing(trained, tmp_path, capsys):
    data, out = trained
    bad = tmp_path / "notes.npz"
    bad.write_text("not a model")
    with pytest.raises(SystemExit):
        main("--thin", bad)
    err = capsys.readouterr().err.strip()
    assert "not an .npz archive" in err and len(err.splitlines()) == 1
    dead = tmp_path / "dead" / "model.npz"
    dead.parent.mkdir()
    dead.write_bytes((out / "model.npz").read_bytes())
    kill_some(dead, conv1_filters=range(4))
    with pytest.raises(SystemExit):
        main("--thin", dead)
    err = capsys.readouterr().err.strip()
    assert "every one of the 4 filters of conv1 is dead" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in dead.parent.iterdir()) == ["model.npz"]
    with pytest.raises(SystemExit):
        main("--thin", out / "model.npz", "--evaluate", out / "model.npz")
    assert "--thin runs alone" in capsys.readouterr().err


def test_thin_refuses_mpiexec(trained, tmp_path, monkeypatch, capsys):
    """Issue 26: under a launcher every rank would thin, writing thin/ and thin-2/; like
    --features, --thin refuses in one line (the launcher is known by its environment)."""
    data, out = trained
    model = tmp_path / "model.npz"
    model.write_bytes((out / "model.npz").read_bytes())
    monkeypatch.setenv("PMI_SIZE", "2")  # what mpiexec -n 2 (MPICH's hydra) sets
    with pytest.raises(SystemExit) as exc:
        main("--thin", model, "--data", data)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err == "run.py: error: --thin runs in one process (no mpiexec)"
    assert os.listdir(tmp_path) == ["model.npz"]


def test_thin_under_a_real_mpiexec_writes_nothing(trained, tmp_path):
    from test_run_distributed import launch  # skips without a working MPI
    data, out = trained
    model = tmp_path / "model.npz"
    model.write_bytes((out / "model.npz").read_bytes())
    code, _, err = launch(["--thin", model, "--data", data, "--workers", 0], timeout=60)
    assert code == 2 and err.count("--thin runs in one process (no mpiexec)") == 1, err
    assert os.listdir(tmp_path) == ["model.npz"]


@pytest.mark.parametrize("out", ["default", "users"])
def test_thin_stopped_midway_leaves_no_folder(trained, tmp_path, monkeypatch, out):
    """Issue 26: Ctrl-C after thin.npz is written (before its report) removes the thin/ folder
    the command made, or only thin.npz from a folder the user already had."""
    import minicompact.cli.thin_command as thin_command

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(thin_command, "atomic_write", ctrl_c)
    data, run_dir = trained
    model = tmp_path / "model.npz"
    model.write_bytes((run_dir / "model.npz").read_bytes())
    extra = []
    if out == "users":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("mine")
        extra = ["--out", tmp_path / "mine"]
    assert main("--thin", model, "--data", data, "--workers", 0, *extra) == 130
    left = sorted(p.name for p in tmp_path.rglob("*"))
    assert left == (["mine", "model.npz", "notes.txt"] if out == "users" else ["model.npz"])


def test_a_moved_data_folder_gets_the_data_hint(trained, tmp_path, capsys):
    """The run's data folder is gone: one line saying to point --data at it, as --evaluate does."""
    data, out = trained
    moved = tmp_path / "moved"
    os.rename(data, moved)
    try:
        with pytest.raises(SystemExit) as exc:
            main("--thin", out / "model.npz", "--workers", 0)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1
        assert "point --data at where the data is now" in err[0]
        assert main("--thin", out / "model.npz", "--data", moved, "--workers", 0, "--out", tmp_path / "t") == 0
    finally:
        os.rename(moved, data)
