"""No step of the training loop waits for the GPU: device→host syncs are counted on a fake GPU.

``fake_gpu`` stands in for CuPy (a NumPy subclass that records every read of a device value
into Python).  The training loop must read the device once per log interval, never once per
layer or per step; a ``float()`` of a loss or an ``int()`` of a label check creeping back into
a loss, a regularizer, a layer or the loop fails these tests, on the CPU, in CI.
"""
import math
from types import SimpleNamespace

import numpy as np
import pytest

import fake_gpu
from minicompact.distributed import Communicator
from minicompact.losses import multiclass_hinge_loss, softmax_cross_entropy
from minicompact.model import CompactNet, ModelConfig
from minicompact.objective import NonFiniteLoss, Penalty, train_step
from minicompact.optim import SGD, StepLR
from minicompact.regularizers import variant
from minicompact.training.stopping import Interrupted
from minicompact.training.recipe import Network
from minicompact.training.trainer import Trainer

CLASSES, SIZE, BATCH = 5, 8, 4


class MemoryLoader:
    """The part of ``BatchLoader`` the Trainer uses: uint8 NCHW images and NumPy labels."""

    def __init__(self, steps, seed=0, ten_crop=False, last=BATCH - 1):
        rng = np.random.default_rng(seed)
        sizes = [BATCH] * (steps - 1) + [last]       # a short last batch, as drop_last=False gives
        crops = (10,) if ten_crop else ()
        self.batches = [(rng.integers(0, 256, (n,) + crops + (3, SIZE, SIZE), dtype=np.uint8),
                         rng.integers(0, CLASSES, n)) for n in sizes]
        self.next_batch, self.skipped = 0, []

    def __len__(self):
        return len(self.batches)

    def epoch(self, epoch, start_batch=0):
        for i in range(start_batch, len(self.batches)):
            self.next_batch = i + 1
            yield self.batches[i]


def make_trainer(device, name="compact", update="subgradient", loss_fn=softmax_cross_entropy,
                 pool="separable", steps=3, out_dir=None):
    model = CompactNet(ModelConfig(depth=3, num_classes=CLASSES, width_mult=1 / 32, stem="small"),
                       seed=0).to(device)
    for pool_layer in model.pools:
        pool_layer.impl = pool
    opt = SGD(model.param_layers, lr=0.01, momentum=0.9)
    reg = Penalty(model, variant(name, 3, 0.5), update=update)
    images = SimpleNamespace(train=MemoryLoader(steps), val=MemoryLoader(2, seed=1), mean=[0.5] * 3, std=[0.25] * 3)
    return Trainer(Network(model, opt, StepLR(0.01), reg, loss_fn), images, epochs=1, out_dir=out_dir,
                   progress=False)


@pytest.mark.parametrize("name, update, loss_fn, pool", [
    ("compact", "subgradient", softmax_cross_entropy, "separable"),
    ("compressed", "proximal", multiclass_hinge_loss, "simple"),
    ("simple", "subgradient", softmax_cross_entropy, "simple"),
])
def test_an_epoch_reads_the_device_once_per_log_interval(monkeypatch, name, update, loss_fn, pool):
    syncs = fake_gpu.install(monkeypatch)
    steps = 4
    trainer = make_trainer("gpu", name, update, loss_fn, pool, steps)
    assert type(trainer.model.classifier.params["W"]) is fake_gpu.DeviceArray   # on the "GPU"
    trainer.log_interval = math.inf       # read only at the end of the epoch
    syncs.clear()
    stats = trainer.train_epoch(0)
    assert [what for what, _ in syncs] == ["asnumpy()"], f"{len(syncs)} syncs in {steps} steps: {syncs}"
    assert math.isfinite(stats["loss"]) and 0 <= stats["train_top1"] <= 1
    trainer.log_interval = 0.0            # read after every step: still one read per step
    syncs.clear()
    trainer.train_epoch(1)
    assert len(syncs) == steps + 1, syncs
    assert {where.split(":")[0] for _, where in syncs} == {"device_sums.py"}, syncs


def test_evaluation_reads_the_device_once(monkeypatch):
    syncs = fake_gpu.install(monkeypatch)
    trainer = make_trainer("gpu")
    for loader in (MemoryLoader(3, seed=2), MemoryLoader(2, seed=3, ten_crop=True)):
        syncs.clear()
        result = trainer.evaluate(loader)
        assert len(syncs) == 1, syncs
        assert result["n"] == sum(len(labels) for _, labels in loader.batches)
        assert 0 <= result["top1"] <= 1


def test_the_counter_sees_a_sync_in_the_step(monkeypatch):
    """The control: train_step's own finiteness check reads the loss, one sync per step, and
    the fake GPU catches it; so would it a float() or int() in a layer, loss or regularizer."""
    syncs = fake_gpu.install(monkeypatch)
    trainer = make_trainer("gpu")
    images, labels = trainer.train_loader.batches[0]
    x, y = trainer._to_model(images, labels)
    syncs.clear()
    train_step(trainer.model, trainer.optimizer, x, y, trainer.regularizer, check_finite=True)
    assert [what for what, _ in syncs] == ["float()"], syncs
    syncs.clear()
    train_step(trainer.model, trainer.optimizer, x, y, trainer.regularizer, check_finite=False)
    assert syncs == []


def test_the_counter_sees_element_reads_and_refuses_mixed_arrays(monkeypatch):
    """The fake GPU's own controls: a[i] is a 0-d device array as on CuPy (so float(a[i]) or
    a float of an iterated value is a counted sync, not a free host scalar), functions whose
    result size depends on the values are syncs, and an operation mixing a device array
    with a NumPy array raises, as CuPy does."""
    syncs = fake_gpu.install(monkeypatch)
    a = fake_gpu.FAKE.arange(3.0)
    assert type(a[1]) is fake_gpu.DeviceArray
    float(a[1])
    [float(v) for v in a]
    assert [what for what, _ in syncs] == ["float()"] * 4, syncs
    syncs.clear()
    fake_gpu.FAKE.nonzero(a > 0), fake_gpu.FAKE.where(a > 0), (a > 0).nonzero()
    fake_gpu.FAKE.where(a > 0, a, 0)                        # three arguments: no sync
    assert [what for what, _ in syncs] == ["nonzero()", "where()", "nonzero()"], syncs
    with pytest.raises(TypeError, match="mixes a device array with a NumPy array"):
        a + np.ones(3)
    a += np.float32(1)                                       # NumPy scalars are fine
    assert type(a) is fake_gpu.DeviceArray


class MirrorCommunicator(Communicator):
    """Two ranks that hold the same data, in one process: every sum doubles.  Its collectives
    stay on the device, as NCCL's do, so what the fake GPU counts is the data-parallel code
    around them (GradientAllReduce, SyncBatchNorm2D, the Trainer's multi-rank branches)."""

    def __init__(self):
        super().__init__()
        self.size = 2

    def allreduce(self, x, op="sum"):
        if op == "sum":
            x *= 2
        return x

    def sum(self, values):
        return [2 * float(v) for v in values]

    def gather_object(self, obj, root=0):
        return [obj] * self.size


@pytest.mark.parametrize("sync_bn", [False, True])
def test_a_data_parallel_epoch_reads_the_device_once(monkeypatch, sync_bn):
    syncs = fake_gpu.install(monkeypatch)
    one = make_trainer("gpu")
    images = SimpleNamespace(train=one.train_loader, val=one.val_loader, mean=one.mean, std=one.std)
    trainer = Trainer(Network(one.model, one.optimizer, one.schedule, one.regularizer, one.loss_fn), images,
                      epochs=1, progress=False, comm=MirrorCommunicator(), sync_bn=sync_bn)
    assert trainer.reducer is not None
    trainer.log_interval = math.inf
    syncs.clear()
    stats = trainer.train_epoch(0)
    assert [what for what, _ in syncs] == ["asnumpy()"], syncs
    assert math.isfinite(stats["loss"])


def test_epoch_sums_equal_the_per_step_values():
    """The device-side sums give the same epoch means as reading every step on the host."""
    trainer, twin = make_trainer("cpu"), make_trainer("cpu")
    stats = trainer.train_epoch(0)
    loss = objective = top1 = n = 0.0
    for step, (images, labels) in enumerate(twin.train_loader.epoch(0)):
        x, y = twin._to_model(images, labels)
        lr = twin.schedule.lr_at(0, step, len(twin.train_loader))
        value, data_loss, scores = train_step(twin.model, twin.optimizer, x, y, twin.regularizer, lr=lr)
        k = len(labels)
        loss, objective, n = loss + float(data_loss) * k, objective + float(value) * k, n + k
        top1 += int((scores.argmax(axis=1) == labels).sum())
    assert stats["loss"] == pytest.approx(loss / n, rel=1e-6)
    assert stats["objective"] == pytest.approx(objective / n, rel=1e-6)
    assert stats["train_top1"] == pytest.approx(top1 / n)


def test_bad_labels_are_caught_on_the_host_before_the_step():
    trainer = make_trainer("cpu")
    trainer.train_loader.batches[1][1][0] = CLASSES          # one label out of range
    before = trainer.model.classifier.params["W"].copy()
    with pytest.raises(ValueError, match=rf"training batch expects labels in \[0, {CLASSES}\)"):
        trainer.train_epoch(0)
    assert not np.array_equal(trainer.model.classifier.params["W"], before)   # step 1 ran, step 2 did not
    trainer.val_loader.batches[0][1][0] = -1
    with pytest.raises(ValueError, match="evaluation batch"):
        trainer.evaluate()


def nan_after(steps):
    """A cross-entropy that returns NaN from call ``steps`` on."""
    calls = []

    def loss_fn(scores, labels):
        calls.append(1)
        loss, d = softmax_cross_entropy(scores, labels)
        return (loss * np.nan if len(calls) > steps else loss), d
    return loss_fn


def test_a_nan_loss_stops_the_run_at_the_next_read_and_writes_no_checkpoint(tmp_path):
    trainer = make_trainer("cpu", loss_fn=nan_after(1), steps=4, out_dir=str(tmp_path))
    trainer.log_interval = math.inf
    with pytest.raises(NonFiniteLoss, match="loss became nan in epoch 1"):
        trainer.fit()
    assert list(tmp_path.iterdir()) == []                    # no last.npz, no best.npz, no log


def test_ctrl_c_after_a_nan_loss_writes_no_checkpoint(tmp_path):
    """Ctrl-C reads the sums before writing last.npz: a diverged model is never saved."""
    class Raised:
        raised = True
    trainer = make_trainer("cpu", loss_fn=nan_after(0), steps=4, out_dir=str(tmp_path))
    trainer.log_interval = math.inf
    with pytest.raises(NonFiniteLoss, match="by step 1"):
        trainer.train_epoch(0, sigint=Raised())
    assert trainer.state["partial"] is None
    healthy = make_trainer("cpu", steps=4)
    healthy.log_interval = math.inf
    with pytest.raises(Interrupted):
        healthy.train_epoch(0, sigint=Raised())
    partial = healthy.state["partial"]
    assert partial["n"] == BATCH and type(partial["top1"]) is int and math.isfinite(partial["loss"])
