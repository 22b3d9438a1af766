"""The optimizer's and the regularizer's kernels (minicompact/cuda/sgd.py) and the captured
training step (minicompact/training/graph_step.py).

On the CPU: the GPU code path on the fake GPU (tests/fake_gpu.py: each kernel runs as its twin,
counted as one launch) gives the NumPy path's parameters bit for bit; the Trainer, given a fake
CUDA runtime that records capture and launch calls, captures once, replays every later full
batch, runs the short last batch and evaluation eagerly, trains exactly as eager steps do, and
falls back with one warning when the capture fails or its replay disagrees.  On a GPU (skipped
without one): each kernel against its twin, and captured training against eager training.
"""
import contextlib
import warnings

import numpy as np
import pytest

import fake_gpu
from minicompact import backend
from minicompact.cuda.sgd import group_shape
from minicompact.training import graph_step
from minicompact.cli.settings import MATH_KEYS, NOT_SAVED
from minicompact.objective import GROUP_GRADIENT, GROUP_SHRINK, Penalty
from minicompact.optim import SGD, SGD_MOMENTUM
from minicompact.regularizers import variant
from test_syncs import make_trainer

gpu = pytest.mark.skipif(not backend.gpu_available(), reason="needs CuPy and a CUDA GPU")


@contextlib.contextmanager
def launches_named(monkeypatch):
    """The names of the kernels the fake GPU is asked to launch."""
    names = []
    real = fake_gpu.FAKE.emulate_kernel

    def emulate(name):
        names.append(name)
        return real(name)
    monkeypatch.setattr(fake_gpu.FakeCupy, "emulate_kernel", staticmethod(emulate))
    yield names


# --------------------------------------------------------------------------- the kernels' path
class Params:
    """The part of a Layer SGD uses."""

    def __init__(self, rng, *shapes):
        self.params = {f"p{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
        self.grads = {k: np.zeros_like(p) for k, p in self.params.items()}

    def to(self, device):
        self.params = {k: backend.to_device(p, device) for k, p in self.params.items()}
        self.grads = {k: backend.to_device(g, device) for k, g in self.grads.items()}
        return self


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_on_the_fake_gpu_is_bit_identical_to_numpy(monkeypatch, momentum, nesterov):
    fake_gpu.install(monkeypatch)
    layers = {}
    for device in ("cpu", "gpu"):
        rng = np.random.default_rng(0)
        layers[device] = [Params(rng, (4, 3, 3, 3), (5,)).to(device), Params(rng, (7, 2, 21)).to(device)]
    opts = {d: SGD(layers[d], lr=0.1, momentum=momentum, nesterov=nesterov, lr_mult=[1.0, 10.0]) for d in layers}
    rng = np.random.default_rng(1)
    with launches_named(monkeypatch) as names:
        for lr in (0.1, 0.05, 0.05, 0.013):
            for i in range(2):
                for k in layers["cpu"][i].grads:
                    g = rng.standard_normal(layers["cpu"][i].grads[k].shape).astype(np.float32)
                    layers["cpu"][i].grads[k][...] = g
                    layers["gpu"][i].grads[k][...] = g
            for opt in opts.values():
                opt.lr = lr
                opt.step()
    assert names == ["sgd-momentum"] * 3 * 4                # one launch per parameter and step
    for cpu, dev in zip(layers["cpu"], layers["gpu"]):
        for k in cpu.params:
            np.testing.assert_array_equal(backend.to_cpu(dev.params[k]), cpu.params[k])
    for k, v in opts["cpu"].velocity.items():
        np.testing.assert_array_equal(backend.to_cpu(opts["gpu"].velocity[k]), v)
    assert float(opts["gpu"].lr_array(fake_gpu.FAKE)) == 0.013    # rewritten when lr is set


@pytest.mark.parametrize("name, update", [("compact", "subgradient"), ("compact", "proximal"),
                                          ("compressed", "proximal"), ("simple", "subgradient")])
def test_the_regularizer_on_the_fake_gpu_is_bit_identical_to_numpy(monkeypatch, name, update):
    """add_gradient, the SGD step and after_step over a few steps, from the same gradients:
    every parameter, gradient and value equal bit for bit; no sync; one launch per array."""
    from minicompact.model import CompactNet, ModelConfig
    syncs = fake_gpu.install(monkeypatch)
    runs = {}
    for device in ("cpu", "gpu"):
        model = CompactNet(ModelConfig(depth=4, num_classes=5, width_mult=1 / 16, stem="small"), seed=0).to(device)
        reg = Penalty(model, variant(name, 4, 0.5), cw=1e-2, ctheta=3e-2, update=update,
                          momentum=0.9, group_scale=(2.0, 3.0))
        runs[device] = (model, SGD(model.param_layers, lr=0.1, momentum=0.9), reg)
    rng = np.random.default_rng(0)
    values = {"cpu": [], "gpu": []}
    syncs.clear()
    with launches_named(monkeypatch) as names:
        for lr in (0.5, 0.5, 0.2):
            grads = [rng.standard_normal(g.shape).astype(np.float32)
                     for layer in runs["cpu"][0].param_layers for g in layer.grads.values()]
            for device, (model, opt, reg) in runs.items():
                slots = [(layer.grads, k) for layer in model.param_layers for k in layer.grads]
                for (store, k), g in zip(slots, grads):
                    store[k] = backend.to_device(g.copy(), device)
                values[device].append(reg.add_gradient())
                opt.lr = lr
                opt.step()
                reg.after_step(opt.step_lr())
    assert syncs == []
    terms = runs["gpu"][2]._terms()
    shrinks = sum(1 for _, c, mix, _ in terms if c * mix) if update == "proximal" else 0
    assert names.count("group-gradient") == 3 * len(terms) and names.count("group-shrink") == 3 * shrinks
    for a, b in zip(values["cpu"], values["gpu"]):
        assert np.asarray(a).dtype == np.float32 and backend.to_cpu(b).item() == np.asarray(a).item()
    (cpu_model, _, _), (gpu_model, _, _) = runs["cpu"], runs["gpu"]
    for (where, layer), (_, twin) in zip(cpu_model.named_layers(), gpu_model.named_layers()):
        for store in ("params", "grads"):
            for k, a in getattr(layer, store).items():
                np.testing.assert_array_equal(backend.to_cpu(getattr(twin, store)[k]), a, err_msg=f"{where}.{k}")


def test_group_shape_needs_trailing_axes():
    assert group_shape(np.zeros((4, 3, 3, 3)), (2, 3)) == (12, 9)
    assert group_shape(np.zeros((4, 3, 3, 3)), (1, 2, 3)) == (4, 27)
    assert group_shape(np.zeros((5, 4, 21)), (2,)) == (20, 21)
    with pytest.raises(ValueError, match="not its last axes"):
        group_shape(np.zeros((4, 3, 3, 3)), (1, 2))


# --------------------------------------------------------------------------- a fake CUDA runtime
class FakeCuda:
    """``cupy.cuda`` as far as graph_step uses it, on the CPU.  Capture cannot stop NumPy
    from computing, so the "captured" step runs once during capture (CapturedStep restores the
    state after it), and a launch runs the step again on the fixed input buffers, writing its
    outputs where the captured ones are, as a replay does.  bake_lr: a launch uses the rate
    set at capture, as a graph with the rate fixed in a kernel's arguments would."""

    def __init__(self, fail_capture=False, bake_lr=False):
        self.calls, self.fail_capture, self.bake_lr = [], fail_capture, bake_lr
        self.step = self.trainer = None
        self.capturing = False
        self.null = FakeStream(self, "current")

    def Stream(self, non_blocking=False):  # noqa: N802 - CuPy's name
        assert non_blocking
        return FakeStream(self, "side")

    def get_current_stream(self):
        return self.null

    def MemoryPool(self):  # noqa: N802
        return type("Pool", (), {"malloc": None})()

    @staticmethod
    def using_allocator(malloc):
        return contextlib.nullcontext()


class FakeStream:
    def __init__(self, cuda, name):
        self.cuda, self.name = cuda, name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def record(self):
        return self.name

    def wait_event(self, event):
        pass

    def begin_capture(self):
        self.cuda.calls.append("begin_capture")
        self.cuda.capturing = True
        if self.cuda.fail_capture:
            raise RuntimeError("cudaErrorStreamCaptureUnsupported: operation not permitted when stream is capturing")

    def end_capture(self):
        self.cuda.calls.append("end_capture")
        self.cuda.capturing = False
        return FakeGraph(self.cuda, self.cuda.trainer.optimizer.lr)


class FakeGraph:
    def __init__(self, cuda, lr):
        self.cuda, self.lr = cuda, lr

    def launch(self, stream):
        assert stream.name == "side"
        self.cuda.calls.append("launch")
        step, optimizer = self.cuda.trainer.step, self.cuda.trainer.optimizer
        rate = optimizer.lr
        if self.cuda.bake_lr:
            optimizer.lr = self.lr
        outputs = step.fn(*step.inputs)
        if all(isinstance(out, np.ndarray) for out in step.outputs):   # device arrays: in place
            for out, new in zip(step.outputs, outputs):
                out[...] = new
        else:                                                          # NumPy's 0-d results are scalars
            step.outputs = tuple(outputs)
        optimizer.lr = rate


def graph_trainer(monkeypatch, cuda, **kw):
    monkeypatch.setattr(graph_step, "cuda_of", lambda xp: cuda)
    trainer = make_trainer(kw.pop("device", "cpu"), steps=4, **kw)   # 3 full batches and a short one
    cuda.trainer = trainer
    return trainer


def parameters(trainer):
    return [backend.to_cpu(a).copy() for a in trainer._state_arrays()]


def train(trainer, epochs=2):
    trainer.log_interval = float("inf")
    return [trainer.train_epoch(epoch) for epoch in range(epochs)]


@pytest.mark.parametrize("update", ["subgradient", "proximal"])
def test_the_trainer_captures_once_and_replays_every_later_full_batch(monkeypatch, update):
    syncs = fake_gpu.install(monkeypatch)
    eager = make_trainer("gpu", update=update, steps=4)
    eager.step.wanted = False
    cuda = FakeCuda()
    trainer = graph_trainer(monkeypatch, cuda, device="gpu", update=update)
    assert trainer.step.wanted
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # no fallback
        syncs.clear()
        stats = train(trainer, epochs=1)
        assert len(syncs) == 2, syncs                  # the capture's one check, the epoch's read
        syncs.clear()
        stats += train(trainer, epochs=1)
        assert [what for what, _ in syncs] == ["asnumpy()"], syncs   # replays read nothing
    # epoch 1: the first batch eager (and the check's replay), batches 2 and 3 replayed, the
    # short 4th eager; epoch 2: three replays, the short one eager.
    assert cuda.calls == ["begin_capture", "end_capture"] + ["launch"] * 6
    trainer.evaluate()
    assert cuda.calls.count("launch") == 6             # evaluation is eager
    expected = train(eager)
    for a, b in zip(parameters(trainer), parameters(eager)):
        np.testing.assert_array_equal(a, b)            # the same training, bit for bit
    for got, want in zip(stats, expected):
        for key in ("loss", "objective", "train_top1", "train_top5"):
            assert got[key] == want[key], key


@pytest.mark.parametrize("cuda, why", [
    (FakeCuda(fail_capture=True), "RuntimeError: cudaErrorStreamCaptureUnsupported"),
    (FakeCuda(bake_lr=True), "CaptureFailed: one replay from the eager step.s starting state did not reproduce"),
])
def test_a_capture_that_fails_or_disagrees_warns_once_and_trains_eagerly(monkeypatch, cuda, why):
    eager = make_trainer("cpu", steps=4)
    eager.step.wanted = False
    trainer = graph_trainer(monkeypatch, cuda)
    with pytest.warns(UserWarning, match=rf"could not be captured as a CUDA graph \({why}.*runs eagerly") as caught:
        train(trainer)
    assert len([w for w in caught if "CUDA graph" in str(w.message)]) == 1
    assert cuda.calls.count("begin_capture") == 1 and trainer.step.graph is None
    assert cuda.calls.count("launch") == (1 if cuda.bake_lr else 0)      # the check's replay only
    train(eager)
    for a, b in zip(parameters(trainer), parameters(eager)):
        np.testing.assert_array_equal(a, b)            # the check changed no number


def test_a_step_that_replaces_its_state_is_not_captured(monkeypatch):
    cuda = FakeCuda()
    trainer = graph_trainer(monkeypatch, cuda)
    step = trainer._train_batch

    def replacing(x, y):
        out = step(x, y)
        trainer.model.bns[0].buffers["running_mean"] = trainer.model.bns[0].buffers["running_mean"].copy()
        return out
    trainer.step.fn = replacing
    with pytest.warns(UserWarning, match="replaced a parameter or buffer instead of updating it in place"):
        train(trainer, epochs=1)
    assert trainer.step.graph is None


def test_a_step_that_fails_inside_the_capture_ends_it_and_reports_why(monkeypatch):
    """As a host read inside the step does on a GPU: the capture is ended, the step's own
    error is the one reported, and training goes on eagerly."""
    cuda = FakeCuda()
    trainer = graph_trainer(monkeypatch, cuda)
    step = trainer._train_batch

    def reading(x, y):
        if cuda.capturing:
            raise RuntimeError("cudaErrorStreamCaptureUnsupported: a sync inside the capture")
        return step(x, y)
    trainer.step.fn = reading
    with pytest.warns(UserWarning, match="RuntimeError: cudaErrorStreamCaptureUnsupported: a sync inside"):
        train(trainer, epochs=1)
    assert cuda.calls == ["begin_capture", "end_capture"] and trainer.step.graph is None


def test_modes():
    assert graph_step.check_mode("auto", np) is False and graph_step.check_mode("off", np) is False
    with pytest.raises(ValueError, match="--cuda-graph on needs one process on a GPU"):
        graph_step.check_mode("on", np)
    with pytest.raises(ValueError, match="cuda_graph must be one of"):
        graph_step.check_mode("always", np)
    assert graph_step.cuda_of(fake_gpu.FAKE) is None    # a stand-in without streams: eager


def test_auto_on_a_fake_gpu_and_the_cpu_runs_eagerly(monkeypatch):
    assert make_trainer("cpu").step.wanted is False
    fake_gpu.install(monkeypatch)
    assert make_trainer("gpu").step.wanted is False


# --------------------------------------------------------------------------- the flag
def test_cuda_graph_on_the_cpu_is_a_one_line_error(capsys):
    import run
    with pytest.raises(SystemExit) as exc:
        run.main(["--cuda-graph", "on", "--device", "cpu", "--check"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("run.py: error: --cuda-graph on needs a GPU"), err
    assert run.main(["--cuda-graph", "auto", "--device", "cpu", "--check"]) == 0
    assert capsys.readouterr().err == ""
    assert "cuda_graph" not in MATH_KEYS and "cuda_graph" not in NOT_SAVED   # saved, changes no number


# --------------------------------------------------------------------------- on a GPU
def _random(cupy, shape, dtype, seed):
    return cupy.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_kernels_agree_with_their_twins_on_a_gpu(dtype):
    """SGD bit for bit (its products are rounded as the twin's are); the group kernels to
    float rounding (their norms sum in another order), over group sizes below, at and far
    above a warp, a zero group and one under the threshold."""
    import cupy
    lr = cupy.asarray(np.float64(0.03))
    for momentum, nesterov in ((0.0, False), (0.9, False), (0.9, True)):
        p, g, v = (_random(cupy, (1000, 37), dtype, s) for s in range(3))
        fns = SGD_MOMENTUM.compile(cupy, np.dtype(dtype))
        got = SGD_MOMENTUM.launch(fns, p, g, v if momentum else None, lr, 3.0, momentum, nesterov)
        want = SGD_MOMENTUM.twin(p, g, v if momentum else None, lr, 3.0, momentum, nesterov)
        for a, b in zip(got, want):
            assert (a is None) == (b is None) and (a is None or bool(cupy.array_equal(a, b)))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for shape, axes in (((40, 30, 21), (2,)), ((64, 32, 3, 3), (2, 3)), ((16, 512, 3, 3), (1, 2, 3)),
                        ((3, 2, 1, 1), (2, 3))):
        x, grad = _random(cupy, shape, dtype, 4), _random(cupy, shape, dtype, 5)
        x[0] = 0
        x[1] *= 1e-4
        for subgradient in (True, False):
            args = (x, grad, cupy.asarray(np.asarray(0.5, dtype)), 0.01, 0.3, axes, subgradient)
            got = GROUP_GRADIENT.launch(GROUP_GRADIENT.compile(cupy, np.dtype(dtype)), *args)
            want = GROUP_GRADIENT.twin(*args)
            for a, b in zip(got, want):
                assert float(cupy.abs(a - b).max()) <= tol * max(1.0, float(cupy.abs(b).max())), (shape, subgradient)
        args = (x, lr, 0.1, 0.5, 0.5, axes)
        got = GROUP_SHRINK.launch(GROUP_SHRINK.compile(cupy, np.dtype(dtype)), *args)
        want = GROUP_SHRINK.twin(*args)
        assert float(cupy.abs(got - want).max()) <= tol * float(cupy.abs(want).max()), shape
        assert bool(((got == 0) == (want == 0)).all()), shape      # the same groups at exactly zero


@gpu
@pytest.mark.parametrize("update", ["subgradient", "proximal"])
def test_captured_training_matches_eager_training_on_a_gpu(update):
    """Two epochs with the step captured (--cuda-graph on) against the same with eager steps:
    captured without a warning, replayed, and the same weights to float rounding."""
    trainers = {}
    for mode in ("on", "off"):
        trainer = make_trainer("gpu", update=update, steps=4)
        trainer.step.wanted = mode == "on"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            train(trainer)
        trainers[mode] = trainer
    assert trainers["on"].step.graph is not None
    for a, b in zip(parameters(trainers["on"]), parameters(trainers["off"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
