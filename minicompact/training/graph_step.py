"""A training step captured once as a CUDA graph and replayed for every full batch (``--cuda-graph``).

On a GPU the host spends about 10 µs launching each kernel, and a step of a small network is
hundreds of them: the GPU waits for the host.  A CUDA graph records every launch of one step
once (stream capture: nothing runs while recording) and replays the whole record with a
single call.  ``CapturedStep`` wraps the Trainer's step function ``fn(*inputs) -> outputs``:

1. The first full batch runs eagerly on a side stream: it is that batch's real step, and it
   warms a private memory pool.  The state the step starts from and the state it leaves are
   copied aside.
2. The step is captured with its inputs in fixed device buffers and the learning rate set
   to a decoy (half of it), then the starting state is put back, the rate set right and the
   graph replayed once.
3. Parameters, momentum buffers, batch-norm statistics and outputs after the replay must
   match the eager step's (to 1e-3 of what the step changed, plus a few float roundings):
   a rate baked into a kernel as a number shows as the decoy's update, a step that ran
   outside the capture as no update at all.  Then the eager step's state is put back, so the
   check changes no number of the training.  Any failure (capture raising, a state array
   replaced instead of updated in place, a mismatch) warns once and the steps run eagerly.
4. Every later batch of the same shapes copies its inputs into the buffers, writes its rate
   into the optimizer's device scalar (``SGD.lr``) and replays.  Other shapes (a short last
   batch) and evaluation run eagerly, on the default stream; events order the side stream
   against it both ways, so nothing waits on the host.

What capture asks of the step, all true of ``Trainer._step``: every array it keeps between
steps is updated in place, so its address is fixed; no host value is read inside it (the one
read per log interval of tests/test_syncs.py is outside); no host number that changes between
steps is in a kernel's arguments (the learning rate is read on the device: ``cuda/sgd.py``).
Its memory comes from a pool of its own that nothing else allocates from after the capture,
so an eager allocation never lands on memory a replay writes; it costs about one step's
activations of extra device memory.
"""
import contextlib
import warnings

import numpy as np

MODES = ("auto", "on", "off")
RTOL = 1e-3   # of the largest change the eager step made to an array
ULPS = 8      # roundings of the array's largest value


class CaptureFailed(RuntimeError):
    """The captured step could not be trusted (the reason is the message)."""


def cuda_of(xp):
    """``xp``'s CUDA runtime module (``cupy.cuda``) when it can capture graphs; None for NumPy and
    for a stand-in for CuPy without streams.  Tests replace it with a fake runtime."""
    cuda = getattr(xp, "cuda", None)
    stream = getattr(cuda, "Stream", None)
    return cuda if hasattr(stream, "begin_capture") else None


def check_mode(mode, xp, ranks=1):
    """Whether steps are to be captured: ``mode`` (auto|on|off) on this device with ``ranks``
    processes.  ValueError (one line) for an unknown mode, and for ``on`` where no graph can be
    captured (the CPU; a data-parallel run, whose all-reduce is not captured)."""
    if mode not in MODES:
        raise ValueError(f"cuda_graph must be one of {MODES}, got {mode!r}")
    possible = cuda_of(xp) is not None and ranks == 1
    if mode == "on" and not possible:
        raise ValueError("--cuda-graph on needs one process on a GPU" + ("" if ranks == 1 else
                                                                       f", not {ranks} ranks"))
    return mode != "off" and possible


class CapturedStep:
    """``fn(*inputs)``, captured as a CUDA graph at the first full batch and replayed (module doc).

    fn: one training step, ``fn(*inputs) -> tuple of device arrays`` (its outputs: valid until
    the next step); xp: the array module; state: ``state() -> list`` of every array the step
    updates in place (parameters, momentum buffers, batch-norm statistics); set_lr:
    ``set_lr(lr)`` writes the rate the next step uses (to a device scalar on a GPU);
    capture: False runs every step eagerly.
    """

    def __init__(self, fn, xp, state, set_lr, capture=True):
        self.fn, self.xp, self.state, self.set_lr = fn, xp, state, set_lr
        self.wanted = bool(capture)   # no capture tried yet, or one that worked
        self.graph = self.inputs = self.outputs = self.shapes = None
        self.stream = self.pool = None

    def __call__(self, lr, *inputs, full=True):
        """The step's outputs for a batch: replayed when one was captured for these shapes,
        captured now when none was and the batch is ``full``, eager otherwise."""
        self.set_lr(lr)
        shapes = None if any(x is None for x in inputs) else [(x.shape, x.dtype) for x in inputs]
        if self.graph is not None and shapes == self.shapes:
            return self._replay(inputs)
        if self.wanted and self.graph is None and full and shapes is not None:
            return self._capture(lr, inputs, shapes)
        return self.fn(*inputs)

    # -- on the side stream ------------------------------------------------------------------
    @contextlib.contextmanager
    def _on_stream(self):
        """Run the block on the side stream with the private pool, ordered after everything
        already queued on the current stream and before everything queued after it."""
        cuda = cuda_of(self.xp)
        current = cuda.get_current_stream()
        self.stream.wait_event(current.record())
        try:
            with self.stream, cuda.using_allocator(self.pool.malloc):
                yield
        finally:
            current.wait_event(self.stream.record())

    def _launch(self):
        cuda = cuda_of(self.xp)
        current = cuda.get_current_stream()
        self.stream.wait_event(current.record())
        self.graph.launch(self.stream)
        current.wait_event(self.stream.record())

    def _replay(self, inputs):
        for buffer, x in zip(self.inputs, inputs):
            buffer[...] = x
        self._launch()
        return self.outputs

    # -- the first full batch -------------------------------------------------------------------
    def _capture(self, lr, inputs, shapes):
        cuda = cuda_of(self.xp)
        self.stream, self.pool = cuda.Stream(non_blocking=True), cuda.MemoryPool()
        start = [a.copy() for a in self.state()]
        with self._on_stream():
            outputs = self.fn(*inputs)   # this batch's step, eagerly; it also warms the pool
        done = [a.copy() for a in self.state()]
        try:
            self._record(lr, inputs, start, done, outputs)
            self.shapes = shapes
        except Exception as exc:  # noqa: BLE001 - any failure of capture or replay: run eagerly
            self.graph = self.inputs = self.outputs = self.stream = self.pool = None
            self.wanted = False
            why = f"{type(exc).__name__}: {exc}".splitlines()[0]
            warnings.warn(f"--cuda-graph: the training step could not be captured as a CUDA graph ({why}); "
                          "it runs eagerly (the same maths, more launches)", stacklevel=3)
        finally:
            self._put(done)              # the eager step's result: the check changes nothing
            self.set_lr(lr)
        return outputs

    def _record(self, lr, inputs, start, done, eager_outputs):
        """Capture ``fn`` on fixed buffers, replay it once from ``start`` and check it against
        the eager step (``done``, ``eager_outputs``); CaptureFailed if it differs."""
        arrays = self.state()
        with self._on_stream():
            self.inputs = [x.copy() for x in inputs]
            self.set_lr(lr / 2)          # a decoy: a rate fixed into the graph would show
            self.stream.begin_capture()
            try:
                outputs = self.fn(*self.inputs)
            except BaseException:
                with contextlib.suppress(Exception):  # leave capture mode; report fn's error
                    self.stream.end_capture()
                raise
            self.graph = self.stream.end_capture()
        if [id(a) for a in self.state()] != [id(a) for a in arrays]:
            raise CaptureFailed("the step replaced a parameter or buffer instead of updating it in place")
        self.outputs = tuple(outputs)
        self._put(start)
        self.set_lr(lr)
        self._launch()
        self._check(start, done, eager_outputs)

    def _put(self, saved):
        for a, s in zip(self.state(), saved):
            a[...] = s

    def _check(self, start, done, eager_outputs):
        """CaptureFailed unless the replay left every state array and output where the eager
        step did: |replay − eager| <= RTOL·(largest change the eager step made; for an output
        its largest value) + ULPS roundings of its largest value; integer outputs exactly.
        All arrays are compared on the device and read once."""
        xp = self.xp
        if len(self.outputs) != len(eager_outputs):
            raise CaptureFailed(f"{len(self.outputs)} outputs captured, {len(eager_outputs)} eager")
        pairs = list(zip(self.state(), done, start)) + [(a, e, None) for a, e in zip(self.outputs, eager_outputs)]
        flags = []
        for now, expected, before in pairs:
            if now.shape != expected.shape:
                raise CaptureFailed(f"an array of shape {now.shape} against the eager {expected.shape}")
            if now.size == 0:
                continue
            error = xp.abs(now.astype(np.float64) - expected.astype(np.float64)).max()
            if np.dtype(expected.dtype).kind != "f":
                flags.append(error == 0)
                continue
            size = xp.abs(expected).max().astype(np.float64)
            change = size if before is None else xp.abs(expected - before).max().astype(np.float64)
            flags.append(error <= RTOL * change + ULPS * float(np.finfo(expected.dtype).eps) * size)
        if flags and not bool(xp.stack(flags).all()):  # the one read of the capture
            raise CaptureFailed("one replay from the eager step's starting state did not reproduce its result")
