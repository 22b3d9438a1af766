"""The training loop: epochs of SGD on eq. 1, evaluation, checkpoints, logs and the final report.

``Trainer`` takes the pieces ``recipe.py`` builds — a ``Network`` (a ``CompactNet``, an ``SGD``
optimizer with its ``StepLR`` schedule, a ``Penalty`` of eq. 1, the loss) and ``Images`` (the
train and val loaders, the normalisation) — and adds what a long run needs:

* a JSON-lines log (one object per epoch) and a progress bar per epoch;
* ``last.npz`` written atomically after every epoch, ``best.npz`` for the best val top-1;
* exact resume: the data order and crops are pure functions of (seed, epoch, index), the
  learning rate a pure function of (epoch, step), and a checkpoint holds the weights, batch-norm
  statistics, momentum buffers, position inside the epoch and the epoch's running sums, so a
  resumed run ends bit-identical (on the CPU) to an uninterrupted one;
* Ctrl-C or SIGTERM finishes the current step, writes ``last.npz`` and stops; a second one
  stops at once;
* a non-finite loss stops the run with a message, keeping the last good checkpoint;
* at most one device→host sync per step: the step's statistics are summed on the device
  (``DeviceSums``) and read once per ``Trainer.log_interval`` seconds, at the end of an
  epoch and before any checkpoint; that read is also where a NaN or infinite loss is noticed
  (``Trainer._read_sums``), so it stops the run at most one log interval after it appeared,
  and every checkpoint first checks that the weights are finite (``Trainer.save``), so a
  diverged model is never written;
* on a GPU, the step captured once as a CUDA graph and replayed for every full batch
  (``graph_step.CapturedStep``; ``cuda_graph``: auto|on|off), checked against an eager step
  first, with partial batches and evaluation eager;
* data-parallel training when given a communicator of several ranks (``distributed``):
  the loaders read each rank's part of the data (``BatchLoader(rank=, ranks=)``), one
  all-reduce per step turns the ranks' gradients into the global batch's, rank 0's weights
  are broadcast at the start, and the ranks stay in step through one small host sum per
  step (how many images the step has in all, whether a rank was asked to stop, whether the
  running sums are due to be read).  Statistics and evaluation counts are summed over the
  ranks; only a Trainer with an ``out_dir`` (rank 0's) writes files, and every checkpoint
  first checks that the replicas are bit-identical.
"""
import json
import math
import os
import time

from ..backend import get_array_module
from ..data.transforms import normalize
from ..distributed.comm import Communicator
from ..distributed.data_parallel import GradientAllReduce, broadcast_model, check_replicas
from ..distributed.sync_batchnorm import use_sync_batchnorm
from ..losses import accuracy_topk, check_labels, softmax
from ..objective import NonFiniteLoss, train_step
from ..system.atomic import atomic_write
from .checkpoint import check_train_state, save_checkpoint
from .device_sums import DeviceSums, EpochSums
from .graph_step import CapturedStep, check_mode
from .progress import ProgressBar
from .stopping import Interrupted, StopSignals, agreed_stop, interrupted, stop_votes


class NoImages(RuntimeError):
    """A split yielded no readable image at all (every file was skipped)."""


class ReplicasDiffer(RuntimeError):
    """The ranks of a data-parallel run no longer hold bit-identical models (a bug, or a
    rank whose hardware computes differently); raised on every rank at a checkpoint."""


def scores(model, images, mean, std, xp):
    """Class scores of one loader batch, normalised on the device: (N, 3, h, w) uint8 → (N, Y);
    a ten-crop batch (N, 10, 3, h, w) → the log of the ten crops' mean soft-max probabilities
    (sec. 5.1), so that ranking and the loss read them like scores."""
    if images.ndim == 5:
        b, c = images.shape[:2]
        x = normalize(images.reshape((b * c,) + images.shape[2:]), mean, std, xp)
        probs = softmax(model.forward(x)).reshape(b, c, -1).mean(axis=1)
        return xp.log(xp.maximum(probs, 1e-30))
    return model.forward(normalize(images, mean, std, xp))


class Trainer:
    """Train a ``Network`` on ``Images`` for ``epochs``; evaluate; checkpoint; resume.

    net: a ``recipe.Network`` (model, optimizer, schedule, penalty, loss); images: a
    ``recipe.Images`` (or anything with ``train`` and ``val`` loaders and the normalisation
    ``mean``, ``std``); out_dir: where logs and checkpoints go (None: nowhere); settings: a
    dict saved in every checkpoint.  Each step is ``objective.train_step``.
    comm: a ``distributed`` communicator (None: one process); with several ranks the loaders
    must be this rank's (``BatchLoader(rank=, ranks=)``), and only rank 0 should be given an
    ``out_dir``, ``progress`` and a ``log``.  sync_bn: normalise with the global batch's
    statistics (``SyncBatchNorm2D``) instead of each rank's own; the running statistics are
    averaged over the ranks at every step either way (``GradientAllReduce(buffers=True)``).
    cuda_graph: "auto" captures the step as a CUDA graph on a GPU with one process (falling back
    to eager steps with a warning if the capture fails its check), "on" the same but a
    ValueError where no graph can be captured, "off" never (``graph_step.py``).
    """

    log_interval = 1.0  # seconds between reads of the running sums (progress bar, NaN check)

    def __init__(self, net, images, epochs, out_dir=None, settings=None, progress=True, log=print,
                 comm=None, sync_bn=False, cuda_graph="auto"):
        self.model, self.optimizer, self.schedule = net.model, net.optimizer, net.schedule
        self.regularizer, self.loss_fn = net.penalty, net.loss
        self.train_loader, self.val_loader = images.train, images.val
        self.mean, self.std = [float(v) for v in images.mean], [float(v) for v in images.std]
        self.epochs, self.out_dir = epochs, out_dir
        self.settings = dict(settings or {})
        self.progress, self.log = progress, log
        model = self.model
        self.xp = get_array_module(model.classifier.params["W"])
        self.state = {"epoch": 0, "step": 0, "best_top1": -1.0, "history": [], "partial": None}
        self.comm, self.reducer = comm or Communicator(), None
        if self.comm.size > 1:
            if sync_bn:
                use_sync_batchnorm(model, self.comm)
            broadcast_model(model, self.comm)
            self.reducer = GradientAllReduce(self.comm, model, buffers=not sync_bn)
        self.step = CapturedStep(self._train_batch, self.xp, self._state_arrays, self._set_lr,
                                  capture=check_mode(cuda_graph, self.xp, self.comm.size))

    # -- one step, one epoch -------------------------------------------------------------
    def _to_model(self, images_u8, labels):
        x = normalize(images_u8, self.mean, self.std, self.xp)
        return x, self.xp.asarray(labels)

    def _train_batch(self, x, labels):
        """One SGD step on eq. 1 at the optimizer's current rate (``train_step``) and the batch's
        top-1/top-5 counts: what ``CapturedStep`` captures.  x, labels: on the device (None on
        a data-parallel rank without readable images).  Returns (objective, loss, top1, top5),
        0-d device arrays (the counts None without images)."""
        value, loss, scores = train_step(self.model, self.optimizer, x, labels, self.regularizer, self.loss_fn,
                                         check_finite=False, reduce_gradients=self.reducer)
        top1, top5 = accuracy_topk(scores, labels, ks=(1, 5)) if x is not None else (None, None)
        return value, loss, top1, top5

    def _set_lr(self, lr):
        self.optimizer.lr = lr

    def _state_arrays(self):
        """Every array a step updates in place: parameters, batch-norm statistics, momentum."""
        return ([a for layer in self.model.layers for store in (layer.params, layer.buffers)
                 for a in store.values()] + self.optimizer.buffers())

    def _read_sums(self, sums, where):
        """Bring the running ``EpochSums`` to the host (one transfer: the one sync of a log
        interval), add them up over the ranks, and stop the run if the loss or the objective
        went NaN or infinite since the epoch began.  Called at every log interval and always
        before a checkpoint can be written, so a diverged model is never saved; every rank
        reads the same sums, so all stop together."""
        host = sums.device.read()
        names = list(host) + ["n"]
        host = dict(zip(names, self.comm.sum([host[k] for k in names[:-1]] + [sums.n])))
        for name in ("loss", "objective"):
            if not math.isfinite(host[name]):
                raise NonFiniteLoss(f"the {name} became {host[name]} {where}; lower --lr or raise "
                                    "--warmup; the last good checkpoint is kept")
        return host

    def _gather_files(self, files):
        """Every rank's list of file names, concatenated in rank order, on every rank."""
        lists = self.comm.broadcast_object(self.comm.gather_object(list(files)))
        return [f for part in lists for f in part]

    def train_epoch(self, epoch, start_step=0, sigint=None):
        """One pass over the training data from batch ``start_step``; returns the epoch's stats.

        Each step: a batch from the loader → normalised on the device → ``train_step`` (eq. 1:
        forward, backward, regularizer, SGD) → its loss and accuracy added to ``EpochSums``
        on the device.  The host reads those sums once per ``log_interval`` seconds and at
        the end (on a GPU no step waits for the queue to drain), so a NaN or infinite loss
        is noticed at the next read and the run stops then without a checkpoint.

        Before each step the ranks sum, on the host (``comm.sum``; one process: nothing to
        exchange), the step's image count over all ranks (0: every image of the global batch
        was unreadable, and every rank skips the step, as one process does), the stop votes
        (Ctrl-C or SIGTERM on any rank: all ranks stop after the same step, one step at least
        after a resume) and whether a rank's log interval is up (all read their sums together).
        """
        model, loader, comm = self.model, self.train_loader, self.comm
        model.train()
        steps, num_classes = len(loader), model.classifier.num_classes
        sums = EpochSums(self.xp, self.state.get("partial"), comm.is_root)
        last_read = sums.t0
        done, skipped_done = start_step, 0  # the last step taken; files skipped up to it
        with ProgressBar(self.progress, steps, start_step, f"epoch {epoch + 1}/{self.epochs}") as bar:
            for images, labels in loader.epoch(epoch, start_batch=start_step):
                # The loader's batch index, not a count of yielded batches: a batch whose
                # images were all unreadable is never yielded, and resume must not drift.
                step, skipped = loader.next_batch, len(loader.skipped)
                check_labels(labels, num_classes, "training batch")  # on the host: no sync
                n = int(labels.shape[0])
                due = time.perf_counter() - last_read >= self.log_interval
                total, asked_int, asked_term, due = comm.sum([n, *stop_votes(sigint), due])
                stop = (asked_int or asked_term) and done > start_step
                if due or stop:
                    host = self._read_sums(sums, f"at epoch {epoch + 1}, by step {done}")
                    last_read = time.perf_counter()
                    bar.show(host, sums.elapsed(last_read))
                if stop:  # after the last step taken, on every rank
                    partial = sums.paused(host, self._gather_files(loader.skipped[:skipped_done]))
                    self.state.update(epoch=epoch, step=done, partial=partial)
                    raise interrupted(f"interrupted at epoch {epoch + 1}, step {done}",
                                      agreed_stop(asked_int, asked_term))
                if total:
                    x, y = self._to_model(images, labels) if n else (None, None)
                    lr = self.schedule.lr_at(epoch, step - 1, steps)
                    value, loss, top1, top5 = self.step(lr, x, y, full=n == getattr(loader, "batch_size", n))
                    if n:
                        sums.add(loss, value, top1, top5, n)
                done, skipped_done = step, skipped
                bar.update(step)
        host = self._read_sums(sums, f"in epoch {epoch + 1}")  # also waits for the GPU
        return sums.finished(host, self._gather_files(loader.skipped))

    def evaluate(self, loader=None, mode=None):
        """Top-1/top-5 accuracy and mean loss over ``loader`` in evaluation mode.

        For a ten-crop loader (batches (N, 10, 3, h, w)) the softmax probabilities of the ten
        crops are averaged before ranking (sec. 5.1).  The sums stay on the device until the
        end (one sync per evaluation).  With several ranks each evaluates its own shard
        (its loader's) and the counts are summed: every rank returns the whole split's
        result, equal to one process's (the accuracies exactly, the loss up to rounding).
        Returns a dict.
        """
        loader = loader or self.val_loader
        model, xp = self.model, self.xp
        num_classes = model.classifier.num_classes
        was = model.training
        model.eval()
        totals = DeviceSums(xp, ("loss", "top1", "top5"))
        n = 0
        try:
            for images, labels in loader.epoch(0):
                check_labels(labels, num_classes, "evaluation batch")
                y = xp.asarray(labels)
                batch_scores = scores(model, images, self.mean, self.std, xp)
                loss, _ = self.loss_fn(batch_scores, y)
                c1, c5 = accuracy_topk(batch_scores, y, ks=(1, 5))
                k = int(labels.shape[0])
                totals.add(loss=loss * k, top1=c1, top5=c5)
                n += k
        finally:
            model.release_caches()
            model.train(was)
        host = totals.read()  # this rank's shard; summed over the ranks: the whole split's
        top1, top5, loss, n, skipped = self.comm.sum([host["top1"], host["top5"], host["loss"], n,
                                                      len(getattr(loader, "skipped", []))])
        n, skipped = int(n), int(skipped)
        if n == 0:
            raise NoImages(f"no image of the evaluation split could be read "
                           f"({skipped} skipped with a warning)")
        return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "n": n, "skipped": skipped}

    # -- checkpoints -----------------------------------------------------------------------
    def _train_state(self):
        return dict(self.state, mean=self.mean, std=self.std, settings=self.settings)

    def _model_is_finite(self):
        """Whether every parameter and buffer is finite: a reduction per array on the device,
        one read (a sync; taken only when a checkpoint is written)."""
        xp = self.xp
        flags = [xp.isfinite(a).all() for _, layer in self.model.named_layers()
                 for store in (layer.params, layer.buffers) for a in store.values()]
        return bool(xp.stack(flags).all())

    def save(self, name):
        """Write checkpoint ``name`` into ``out_dir`` (nothing without one: the other ranks);
        with several ranks, call it on every rank: it first checks that all replicas are
        bit-identical (``ReplicasDiffer`` on every rank otherwise).

        A diverged model is never written: a step's loss is that of the weights before its
        update, so the sums ``_read_sums`` checks cannot see an update that overflowed the
        weights; ``NonFiniteLoss`` (on every rank: the replicas are identical) if any weight
        or batch-norm statistic is inf or NaN.
        """
        if self.comm.size > 1 and not check_replicas(self.model, self.comm):
            raise ReplicasDiffer(f"the {self.comm.size} ranks no longer hold the same model; "
                                 f"{name} was not written (please report this as a bug)")
        if not self._model_is_finite():
            epoch, step = self.state["epoch"], self.state["step"]
            where = f"after epoch {epoch}" if step == 0 else f"at epoch {epoch + 1}, step {step}"
            raise NonFiniteLoss(f"the model's weights became inf or NaN {where}; {name} was not written; "
                                "lower --lr or raise --warmup; the last good checkpoint is kept")
        if self.out_dir is None:
            return None
        path = os.path.join(self.out_dir, name)
        save_checkpoint(path, self.model, self.optimizer, self._train_state())
        return path

    def load_state(self, arrays, opt_state, state):
        """Continue from a checkpoint read by ``checkpoint_check.read_checkpoint`` (its
        arrays, optimizer state and training state): weights, momentum and position.
        Each part is checked again as it loads (a ``CheckpointError`` naming it), so a state
        built by other code is never loaded unchecked."""
        check_train_state(state)
        self.model.load_state_arrays(arrays)
        if self.comm.size > 1:  # every rank read the same file; rank 0's copy is the one
            broadcast_model(self.model, self.comm)
        if opt_state:
            self.optimizer.load_state_dict(opt_state)
        for key in ("epoch", "step", "best_top1", "history", "partial"):
            if key in state:
                self.state[key] = state[key]
        return state

    def _write_log(self):
        """log.jsonl = the history, one JSON object per epoch, rewritten atomically.

        Written whole from the checkpointed history (not appended), so a resumed run's log
        holds exactly its epochs, wherever it resumes and into whichever folder.
        """
        if self.out_dir is None:
            return
        with atomic_write(os.path.join(self.out_dir, "log.jsonl")) as f:
            f.writelines(json.dumps(record) + "\n" for record in self.state["history"])

    # -- the whole run ---------------------------------------------------------------------
    def fit(self):
        """Train from the current state to ``epochs``; returns the history (list of dicts).

        Raises ``Interrupted`` (after writing last.npz) on Ctrl-C or SIGTERM, ``NonFiniteLoss``
        (without writing) when the loss diverges and ``NoImages`` when a whole split was
        unreadable — with several ranks on every rank together, at the same point.
        """
        if self.out_dir is not None:
            os.makedirs(self.out_dir, exist_ok=True)
            if self.state["history"]:  # resumed: the log holds the checkpoint's epochs, no more
                self._write_log()
        with StopSignals(graceful=True) as sigint:
            while self.state["epoch"] < self.epochs:
                epoch, step = self.state["epoch"], self.state["step"]
                try:
                    stats = self.train_epoch(epoch, step, sigint)
                except Interrupted:
                    self.save("last.npz")
                    raise
                if stats["skipped"] and stats["skipped"] >= len(getattr(self.train_loader, "paths", ())):
                    raise NoImages(f"epoch {epoch + 1} could read none of the {stats['skipped']} training "
                                   "images; the last good checkpoint is kept")
                val = self.evaluate()
                record = {"epoch": epoch + 1, "lr": float(self.optimizer.lr), **stats,
                          "val_top1": val["top1"], "val_top5": val["top5"], "val_loss": val["loss"],
                          "val_skipped": val["skipped"]}
                self.state["history"].append(record)
                self.state.update(epoch=epoch + 1, step=0, partial=None)
                self.log(f"epoch {epoch + 1:3d}/{self.epochs}  loss {stats['loss']:.4f}  "
                         f"train top-1 {100 * stats['train_top1']:5.1f}%  "
                         f"val top-1 {100 * val['top1']:5.1f}%  top-5 {100 * val['top5']:5.1f}%  "
                         f"lr {self.optimizer.lr:.4g}  {stats['images_per_s']:.0f} img/s"
                         + (f"  skipped {stats['skipped']}" if stats["skipped"] else ""))
                if val["top1"] > self.state["best_top1"]:
                    self.state["best_top1"] = val["top1"]
                    self.save("best.npz")
                self.save("last.npz")
                self._write_log()  # after the checkpoints: the log never runs ahead of last.npz
                signum = agreed_stop(*self.comm.sum(stop_votes(sigint)))  # a collective
                if signum is not None:
                    raise interrupted(f"interrupted after epoch {epoch + 1}", signum)
        return self.state["history"]
