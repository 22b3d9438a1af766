"""run.py on two MPI ranks (``mpiexec -n 2 python run.py ...``), end to end on a tiny folder.

What a launch must do: one report, one log and checkpoints written by rank 0 only
(the other rank writes nothing, not even a folder); an unreadable file on one rank's part
handled; a run interrupted on one rank resumes bit-identically; the report equal to one
process's evaluation of the same checkpoint; with --sync-bn, two ranks × batch B train like
one process with batch 2B, and a checkpoint resumes on another number of ranks when they can
share its global batch (one line otherwise); a failing rank ends the job.  Faults are
injected through tests/mpi_checks.py ``fault``.  Each launch has a timeout, so a hang fails.

The folder: 3 classes × 11 training images, one of them unreadable, so the global batch of
16 leaves a last batch of one image: rank 1's part of it is always empty (a placeholder
batch), and in some epochs rank 0's one image is the unreadable one (a step no rank can take).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from test_distributed import find_mpiexec, mpi_runtime_problem
from test_run import TINY, arrays, main, read_log, write_folder

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUN = os.path.join(ROOT, "run.py")
CHECKS = os.path.join(HERE, "mpi_checks.py")
FILES = {"best.npz", "curves.png", "last.npz", "log.jsonl", "model.npz", "report.json", "sparsity.png"}


def launch(args, ranks=2, cwd=None, fault=None, timeout=120):
    """``mpiexec -n RANKS python run.py ARGS`` (through mpi_checks.py ``fault`` when ``fault`` =
    (rank, kind, step)); returns (exit status, stdout, stderr)."""
    problem = mpi_runtime_problem()
    if problem:
        pytest.skip(problem)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)  # run.py shares the cores between the ranks itself
    script = [RUN] if fault is None else [CHECKS, "fault", *map(str, fault), "--"]
    proc = subprocess.run([find_mpiexec(), "-n", str(ranks), sys.executable, *script, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_folder(tmp_path_factory.mktemp("mpi") / "data", train=11)
    (root / "train" / "green" / "005.jpg").write_bytes(b"not a jpeg")  # on one rank's part
    (root / "val" / "red" / "000.jpg").write_bytes(b"")  # in rank 1's half of the val split
    return root


@pytest.fixture(scope="module")
def two_epochs(data, tmp_path_factory):
    """An uninterrupted 2-rank run of 2 epochs into the default folder of an empty directory."""
    work = tmp_path_factory.mktemp("work")
    code, out, err = launch(["--data", data, "--epochs", 2, *TINY], cwd=work)
    assert code == 0, out + err
    return work, out, err


def test_rank_0_writes_one_log_one_report_and_every_checkpoint(two_epochs):
    work, out, err = two_epochs
    assert os.listdir(work) == ["runs"] and os.listdir(work / "runs") == ["compact-d3-rho0.03"]
    run_dir = work / "runs" / "compact-d3-rho0.03"
    assert set(os.listdir(run_dir)) == FILES  # no temporary file, no folder of rank 1's
    assert "2 ranks x batch 8 = global batch 16" in out
    for line in ("epoch   1/2", "epoch   2/2", "results (", "run.py: trained 2 epochs"):
        assert out.count(line) == 1, out
    log = read_log(run_dir)
    assert [r["epoch"] for r in log] == [1, 2]
    assert [r["skipped"] for r in log] == [1, 1] and [r["val_skipped"] for r in log] == [1, 1]
    assert all(r["skipped_files"][0].endswith("005.jpg") for r in log)
    state = json.loads(str(np.load(run_dir / "last.npz")["__train__"]))
    assert (state["settings"]["ranks"], state["settings"]["global_batch"]) == (2, 16)
    # Each rank warned about the unreadable files it read itself, naming its rank if not 0.
    assert "skipping unreadable image" in err and "run.py [rank 1]: warning" in err
    report = json.loads((run_dir / "report.json").read_text())
    assert report["after_threshold"]["accuracy"]["single_crop"]["images"] == 11  # 12 val, 1 unreadable


def test_report_equals_one_process_evaluating_the_same_checkpoint(two_epochs, tmp_path):
    work, _, _ = two_epochs
    run_dir = work / "runs" / "compact-d3-rho0.03"
    with pytest.warns(UserWarning, match="unreadable"):
        assert main("--evaluate", run_dir / "last.npz", "--out", tmp_path / "eval", "--workers", 0,
                    "--no-progress") == 0
    two = json.loads((run_dir / "report.json").read_text())
    one = json.loads((tmp_path / "eval" / "report.json").read_text())
    for stage in ("before_threshold", "after_threshold"):
        assert two[stage] == one[stage], stage  # single- and ten-crop errors, image counts, sparsity
    assert "mpi4py.MPI" not in sys.modules  # one process: MPI never started


def test_sigterm_to_one_rank_stops_both_and_resumes_bit_identically(data, two_epochs, tmp_path):
    out = tmp_path / "b"
    # SIGTERM to rank 1 alone after its 4th step: the middle of epoch 2 (3 steps per epoch).
    code, stdout, stderr = launch(["--data", data, "--epochs", 2, "--out", out, *TINY], fault=(1, "SIGTERM", 4))
    assert code == 143, stdout + stderr
    assert stderr.count("interrupted at epoch 2, step 1 by SIGTERM; checkpoint written") == 1, stderr
    assert "Traceback" not in stderr and set(os.listdir(out)) == {"best.npz", "last.npz", "log.jsonl"}
    # Epoch 1 ran before the fault: a difference there is the launches', not the resume's (the
    # fault wrapper must share the cores between the ranks as run.py does, or its BLAS rounds
    # differently).
    assert "before share_cores()" not in stderr, stderr
    same = ("epoch", "loss", "objective", "train_top1", "val_top1", "val_loss", "lr", "skipped")
    whole_log = read_log(two_epochs[0] / "runs" / "compact-d3-rho0.03")
    assert [[r[k] for k in same] for r in read_log(out)] == [[r[k] for k in same] for r in whole_log[:1]]
    code, stdout, stderr = launch(["--resume", out / "last.npz", "--workers", 0, "--no-progress"])
    assert code == 0, stdout + stderr
    whole = arrays(two_epochs[0] / "runs" / "compact-d3-rho0.03" / "last.npz")
    resumed = arrays(out / "last.npz")
    assert whole.keys() == resumed.keys()
    for key in whole:
        np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)
    assert [[r[k] for k in same] for r in read_log(out)] == [[r[k] for k in same] for r in whole_log]


def close(a, b, what):
    assert a.keys() == b.keys()
    for key in (k for k in b if not k.startswith("__")):  # not the model's JSON configuration
        np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=2e-5, err_msg=f"{what}: {key}")


def test_sync_bn_two_ranks_train_like_one_process_with_twice_the_batch(data, tmp_path):
    """2 ranks × batch 8 with --sync-bn = one process with batch 16 (float32 precision), over
    the same global batches, the unreadable file and the one-image last batch included; the
    2-rank checkpoint then resumes on one process (batch 16: the same global batch) and the
    second epoch matches too.  A rank count that cannot share the global batch is refused."""
    one, two = tmp_path / "one", tmp_path / "two"
    single = ["--data", data, "--out", one, *TINY, "--batch-size", 16]
    with pytest.warns(UserWarning, match="unreadable"):
        assert main(*single, "--epochs", 1) == 0
    code, out, err = launch(["--data", data, "--epochs", 1, "--out", two, "--sync-bn", *TINY])
    assert code == 0 and "(sync-BN)" in out, out + err
    close(arrays(two / "last.npz"), arrays(one / "last.npz"), "epoch 1")

    with pytest.warns(UserWarning, match="unreadable"):
        assert main("--resume", one / "last.npz", "--epochs", 2, "--workers", 0, "--no-progress") == 0
        assert main("--resume", two / "last.npz", "--epochs", 2, "--workers", 0, "--no-progress") == 0
    close(arrays(two / "last.npz"), arrays(one / "last.npz"), "epoch 2, resumed on one process")
    state = json.loads(str(np.load(two / "last.npz")["__train__"]))
    assert (state["settings"]["ranks"], state["settings"]["batch_size"], state["settings"]["global_batch"]) == (1, 16, 16)

    code, out, err = launch(["--resume", two / "last.npz", "--epochs", 3], ranks=3)
    assert code == 2 and not out, out + err
    assert err.count("run.py: error:") == 1 and err.count("\n") == 1, err
    assert "global batch 16), which 3 ranks cannot share equally" in err and "divides 16: 1, 2, 4, 8, 16" in err, err


def test_resnet18_with_sync_bn_on_two_ranks_trains_like_one_process(data, tmp_path):
    """--arch resnet18 data-parallel (docs/architectures.md): sync-BN reaches the batch norms
    inside the blocks (``replace_layer``; without it each rank would normalise by its own half
    batch), rank 1 joining their collectives in the last step, where it has no image.  Twenty
    batch norms deep, float32 sums grouped by rank differ from one process's by up to 1e-4 of
    an array's largest value (measured: 7e-5), so each array is compared at 1e-3 of it."""
    one, two = tmp_path / "one", tmp_path / "two"
    resnet = [*TINY, "--arch", "resnet18", "--width-mult", "0.0625", "--epochs", 1]
    with pytest.warns(UserWarning, match="unreadable"):
        assert main("--data", data, "--out", one, *resnet, "--batch-size", 16) == 0
    code, out, err = launch(["--data", data, "--out", two, "--sync-bn", *resnet])
    assert code == 0 and "resnet18 with compactnet's regularizers" in out and "(sync-BN)" in out, out + err
    a, b = arrays(two / "last.npz"), arrays(one / "last.npz")
    assert a.keys() == b.keys()
    for key in (k for k in b if not k.startswith("__")):
        assert np.abs(a[key] - b[key]).max() <= 1e-3 * np.abs(b[key]).max(), key
    assert set(os.listdir(two)) == FILES


def test_a_bad_flag_is_one_line_from_one_rank(tmp_path):
    code, out, err = launch(["--rho", "2"], cwd=tmp_path)
    assert code == 2 and not out and err == "run.py: error: --rho: rho must lie in [0, 1], got 2.0\n", err
    assert os.listdir(tmp_path) == []


def test_a_rank_that_fails_ends_the_job(data, tmp_path):
    code, out, err = launch(["--data", data, "--epochs", 2, "--out", tmp_path / "x", *TINY],
                            fault=(1, "raise", 2), timeout=60)
    assert code != 0, out + err
    assert "a deliberate failure on rank 1" in err and "ending all 2 ranks" in err, err
