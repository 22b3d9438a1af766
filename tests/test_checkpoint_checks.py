"""Issue 26: a damaged or hand-edited checkpoint is refused in one line by every command that
reads one (--evaluate, --resume, --thin, --export, --finetune, --features), before a model is built:
its configuration (types, ranges, a size bound), every array (present, floating-point, of
its shape, finite, running variances >= 0), the momentum buffers and the training state
(``minicompact.training.checkpoint_check``).

One tiny trained run; each case rewrites a copy of its last.npz.  Every refusal is exit 2,
one ``run.py: error:`` line naming what is wrong, no traceback and no new folder.
"""
import json

import numpy as np
import pytest

from minicompact.system.npz import CheckpointError, atomic_savez
from minicompact.training.checkpoint_check import read_checkpoint
from minicompact.model import CompactNet, ModelConfig
from minicompact.optim import SGD
from test_run import TINY, main, write_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data root, path of a one-epoch tiny run's last.npz): depth 3, 4 and 8 filters, 3 classes."""
    root = tmp_path_factory.mktemp("checks")
    data = write_folder(root / "data")
    assert main("--data", data, "--epochs", 1, "--out", root / "run", *TINY) == 0
    return data, root / "run" / "last.npz"


def read_arrays(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def edit_json(key, **fields):
    """An edit of the JSON array ``key`` ("__config__" or "__train__"): set ``fields``."""
    def apply(a):
        d = json.loads(str(a[key]))
        d.update(fields)
        a[key] = np.array(json.dumps(d))
    return apply


def set_value(key, index, value):
    def apply(a):
        a[key][index] = value
    return apply


# case: (edit of the checkpoint's arrays, text the one error line must hold)
CASES = {
    "wrong shape": (lambda a: a.update({"conv2.W": a["conv2.W"][:1]}),
                    "conv2.W: expected shape (8, 4, 3, 3), saved (1, 4, 3, 3)"),
    "missing key": (lambda a: a.pop("bn1.running_var"), "saved state has no 'bn1.running_var'"),
    "string weight": (lambda a: a.update({"classifier.b": np.array(["a", "b", "c"])}),
                      "classifier.b holds text, not floating-point numbers"),
    "NaN weight": (set_value("conv2.W", (0, 0, 0, 0), np.nan), "conv2.W holds NaN or infinite values"),
    "negative running var": (set_value("bn2.running_var", 0, -1.0), "bn2.running_var has negative values"),
    "wrong momentum shape": (lambda a: a.update({"opt.2.W": a["opt.2.W"][:1]}),
                             "opt.2.W: expected shape (8, 4, 3, 3), saved (1, 4, 3, 3)"),
    "epoch -5": (edit_json("__train__", epoch=-5), "training state's epoch must be an integer >= 0, got -5"),
    "epoch 'x'": (edit_json("__train__", epoch="x"), "training state's epoch must be an integer >= 0, got 'x'"),
    "step 1e9": (edit_json("__train__", step=1e9), "step must be an integer >= 0, got 1000000000.0"),
    "layer_widths 1e9": (edit_json("__config__", layer_widths=[1e9, 1e9]),
                         "layer_widths must be null or a list of integers >= 1"),
    "layer_widths 10**9": (edit_json("__config__", layer_widths=[10**9, 10**9]),
                           "declares a model of 9e+18 numbers (widest layer 1000000000 filters"),
    "num_classes 1e9": (edit_json("__config__", num_classes=1e9), "num_classes must be an integer >= 2"),
    "num_classes 10**9": (edit_json("__config__", num_classes=10**9),
                          "num_classes is 1000000000 but it names 3 classes"),
    "width_mult 1e5": (edit_json("__config__", width_mult=1e5), "declares a model of 2.95e+15 numbers"),
}

COMMANDS = {  # how each command is given the checkpoint; "{data}" is the run's data folder
    "--evaluate": ["--evaluate", "{ckpt}", "--workers", 0, "--no-progress"],
    "--resume": ["--resume", "{ckpt}", "--epochs", 2, "--workers", 0, "--no-progress"],
    "--thin": ["--thin", "{ckpt}", "--workers", 0],
    "--export": ["--export", "{ckpt}", "--workers", 0],      # refused before onnx is imported
    "--finetune": ["--finetune", "{ckpt}", "--data", "{data}", "--epochs", 1, "--workers", 0, "--no-progress"],
    "--features": ["--features", "{ckpt}", "--data", "{data}", "--workers", 0],
}


def refusal(capsys, args):
    """The one error line of a run.py that must fail with exit status 2 and no traceback."""
    try:
        code = main(*args)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("run.py: error:")]
    assert code == 2 and "Traceback" not in err, err
    assert len(errors) == 1 and all(line.startswith("run.py:") for line in lines), err
    return errors[0]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_reader_refuses_a_bad_checkpoint_in_one_line(trained, tmp_path, monkeypatch, capsys,
                                                             command, case):
    data, last = trained
    arrays = read_arrays(last)
    edit, expected = CASES[case]
    edit(arrays)
    folder = tmp_path / "run"
    folder.mkdir()
    atomic_savez(folder / "last.npz", arrays)
    monkeypatch.chdir(tmp_path)          # --features' default folder would be runs/ here
    args = [str(a).format(ckpt=folder / "last.npz", data=data) for a in COMMANDS[command]]
    error = refusal(capsys, args)
    assert expected in error and str(folder / "last.npz") in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]       # no output folder
    assert sorted(p.name for p in folder.iterdir()) == ["last.npz"]


def test_resume_refuses_a_step_beyond_the_epoch(trained, tmp_path, capsys):
    """A step that is an integer but past the end of an epoch of this data (24 images in
    batches of 8: 3 steps) is refused once the data is known, before anything is written."""
    data, last = trained
    arrays = read_arrays(last)
    edit_json("__train__", epoch=0, step=10**9)(arrays)
    folder = tmp_path / "run"
    folder.mkdir()
    atomic_savez(folder / "last.npz", arrays)
    error = refusal(capsys, ["--resume", folder / "last.npz", "--epochs", 2, "--workers", 0, "--no-progress"])
    assert "stopped at step 1000000000 of epoch 1, but an epoch of 24 images" in error and "has 3 steps" in error
    assert sorted(p.name for p in folder.iterdir()) == ["last.npz"]


def test_the_checks_pass_a_good_checkpoint_and_its_model_round_trips(trained):
    config, arrays, opt, state = read_checkpoint(trained[1])
    assert config == ModelConfig.from_json(str(arrays["__config__"])) and state["epoch"] == 1
    assert set(opt) == {"0.W", "1.gamma", "1.beta", "2.W", "3.gamma", "3.beta", "4.W", "4.b"}
    model = CompactNet.load(trained[1])
    assert config.state_shapes() == {k: v.shape for k, v in model.state_arrays().items()}


def test_the_loaders_check_what_they_load(trained):
    """``load_state_arrays``, ``SGD.load_state_dict`` and ``CompactNet.load`` check on their own
    (a state built by other code), and nothing is loaded when one array is bad."""
    _, arrays, opt, _ = read_checkpoint(trained[1])
    model = CompactNet.load(trained[1])
    before = model.state_arrays()
    bad = dict(arrays, **{"bn2.running_var": -arrays["bn2.running_var"] - 1})
    with pytest.raises(CheckpointError, match="bn2.running_var has negative values"):
        model.load_state_arrays(bad)
    assert all(np.array_equal(before[k], v) for k, v in model.state_arrays().items())
    sgd = SGD(model.param_layers, momentum=0.9)
    with pytest.raises(ValueError, match=r"opt.0.W holds NaN or infinite values"):
        sgd.load_state_dict(dict(opt, **{"0.W": np.full_like(opt["0.W"], np.inf)}))
    assert sgd.velocity == {}


def test_a_frozen_fine_tune_keeps_no_buffers_for_its_frozen_layers(trained):
    """A fine-tune with --freeze 1 trains bn1 onward: its buffer 0.W belongs to conv2, and a
    buffer of the shape conv1's would have is refused (``optimizer_shapes``)."""
    from minicompact.training.checkpoint_check import check_contents
    config, arrays, opt, state = read_checkpoint(trained[1])
    tuned = dict(state, settings=dict(state["settings"], finetune="src.npz", freeze=1))
    frozen = {"0.W": np.zeros((8, 4, 3, 3), np.float32), "1.gamma": np.zeros(8, np.float32)}
    assert check_contents("ft.npz", arrays, frozen, tuned) == config
    with pytest.raises(CheckpointError, match=r"ft.npz: opt.0.W: expected shape \(8, 4, 3, 3\), saved \(4, 3"):
        check_contents("ft.npz", arrays, opt, tuned)
