"""minicompact against the same CompactNet in PyTorch: one training step, side by side.

    python bench/bench_vs_pytorch.py --device cpu                          # the four networks of the speed table
    python bench/bench_vs_pytorch.py --device gpu --precision tf32 --json out.json
    python bench/bench_vs_pytorch.py --nets demo,depth8 --repeats 10 --threads 2
    python bench/bench_vs_pytorch.py --nets demo,depth8 --conv-algo im2col,winograd   # both
    python bench/bench_vs_pytorch.py --device gpu --nets demo,depth8 --conv-algo im2col \
        --cuda-graph both --kernels both      # eager vs captured, kernels vs twins: 4 columns

For each network: the minicompact model is built, and the same network is written with
torch.nn and given minicompact's weights.  First the two are checked equal: the scores, the
loss, the gradient of every parameter (the group-lasso regularizer's subgradient added the
same way, after the backward) and the parameters after one SGD step with momentum must agree
in float64, the scores and the loss in float32 (see ``check_equal``).  Then whole training
steps (forward, loss, backward, regularizer value and subgradient, SGD) are timed
alternately, minicompact then PyTorch, with no sync inside a step and one at its end; the
medians give images/s and the ratio (above 1: minicompact is faster).  A separate
pass attributes the time to kinds of layers (minicompact: a sync after every layer; PyTorch:
its profiler's self time per operator), and another measures peak memory, each framework in
a fresh process: on a GPU CuPy's pool (peak in use, and reserved) against PyTorch's
``max_memory_allocated`` / ``max_memory_reserved`` over the first two steps; on the CPU the
growth of the process's peak resident set (VmHWM) over two steps, measured after one
warm-up step above the weights, gradients and momentum (malloc's mmap threshold fixed, so
that freed arrays leave the resident set in both frameworks).

``--conv-algo`` takes a comma-separated list of minicompact's convolution algorithms
(im2col, winograd, auto, each optionally +shared: one column workspace shared by all layers;
default both im2col and winograd): each gets its own model (same
seed, same weights), is checked, timed (each minicompact step followed by a PyTorch step, so
every algorithm alternates with PyTorch), attributed and measured, and gets its own column.

``--cuda-graph`` (off, on or both) times minicompact's whole step eager, captured once as a
CUDA graph and replayed, or both: the step function is wrapped in ``CapturedStep``
(minicompact/training/graph_step.py) as ``Trainer`` wraps its own, eager steps with
``capture=False``; the capture (one eager step, the capture, one checked replay) happens
before the warm-up.  A CUDA graph needs a GPU: on the CPU ``on`` stops with one line and
``both`` times the eager step only.  ``--kernels`` (on, off or both) times the hand-written
kernels of minicompact/cuda (on, the default), their array-expression twins
(``MINICOMPACT_KERNELS=off`` around every minicompact call), or both; on the CPU both are the
same NumPy code.  Every combination of algorithm, graph and kernels is a column of its own
(named like ``im2col graph twins``); the equality check and the per-layer pass run once per
algorithm and kernels setting (eagerly), the memory pass with the first kernels setting.

PyTorch is imported here only: minicompact never needs it.  Precision: "fp32" runs strict
float32 in both; "tf32" lets both use TF32 tensor cores for float32 GEMMs and convolutions
(``backend.set_precision`` for CuPy, ``fp32_precision = "tf32"`` for cuBLAS and cuDNN in
PyTorch) and changes nothing on the CPU.
"""
import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from minicompact import backend
from minicompact.backend import array_module, get_array_module, set_precision, synchronize, to_cpu
from minicompact.training.graph_step import CapturedStep, check_mode
from minicompact.losses import softmax_cross_entropy
from minicompact.objective import objective, train_step
from timing import CTHETA, CW, LR, MOMENTUM, NETWORKS, Setup, describe, kernels_switch, layer_times, timed

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - the bench says so in one line
    torch = None


# --------------------------------------------------------------------------- the PyTorch twin
def torch_twin(setup, tdevice):
    """The network of ``setup.model`` in torch.nn, with its weights and BN statistics copied
    (in the model's dtype).

    Returns (module, convs, classifier, config): the regularized layers named for the
    regularizer, ``config`` the minicompact ``RegConfig`` (β per layer, α).
    """
    nn = torch.nn
    model = setup.model
    kw = dict(dtype=getattr(torch, np.dtype(model.classifier.dtype).name), device=tdevice)

    def tensor(a):
        return torch.from_numpy(to_cpu(a).copy()).to(tdevice)

    features = []
    for conv, bn, pool in zip(model.convs, model.bns, model.pools):
        c = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, bias=False, **kw)
        b = nn.BatchNorm2d(bn.channels, eps=bn.eps, momentum=bn.momentum, **kw)
        with torch.no_grad():
            c.weight.copy_(tensor(conv.params["W"]))
            b.weight.copy_(tensor(bn.params["gamma"]))
            b.bias.copy_(tensor(bn.params["beta"]))
            b.running_mean.copy_(tensor(bn.buffers["running_mean"]))
            b.running_var.copy_(tensor(bn.buffers["running_var"]))
        features += [c, b, nn.ReLU(inplace=True), nn.MaxPool2d(3, pool.stride, pool.padding)]
    W = model.classifier.params["W"]
    classes, channels, regions = W.shape
    linear = nn.Linear(channels * regions, classes, **kw)
    with torch.no_grad():
        linear.weight.copy_(tensor(W.reshape(classes, -1)))
        linear.bias.copy_(tensor(model.classifier.params["b"]))
    levels = model.spp.levels

    class TorchCompactNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*features)
            self.classifier = linear

        def forward(self, x):
            f = self.features(x)
            # adaptive max-pool bins are [floor(iH/n), ceil((i+1)H/n)): minicompact's pyramid_bins
            pyramid = torch.cat([F.adaptive_max_pool2d(f, n).flatten(2) for n in levels], dim=2)
            return self.classifier(pyramid.flatten(1))

    net = TorchCompactNet().to(tdevice)
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    return net, convs, linear, setup.regularizer.config


def torch_regularizer(convs, linear, config, regions):
    """C_W Ω(W) + C_Θ Σ Γ_l(Θ^l): add its subgradient to the gradients (as minicompact's
    ``Penalty.add_gradient`` does, after the backward) and return its value (a tensor)."""
    def mixed(x, mix, dims):
        sq = x.square().sum(dim=dims, keepdim=True)
        value = (1 - mix) * 0.5 * sq.sum()
        if mix == 0:
            return value, (1 - mix) * x
        norms = sq.sqrt()
        inverse = torch.where(norms > 0, 1 / norms.clamp_min(1e-30), torch.zeros_like(norms))
        return value + mix * norms.sum(), x * ((1 - mix) + mix * inverse)

    with torch.no_grad():
        W = linear.weight.view(linear.out_features, -1, regions)
        value, dW = mixed(W, config.alpha, (2,))
        value = CW * value
        linear.weight.grad += CW * dW.view_as(linear.weight)
        dims = (2, 3) if config.conv_term == "gamma" else (1, 2, 3)
        for conv, beta in zip(convs, config.betas):
            v, d = mixed(conv.weight, beta, dims)
            value = value + CTHETA * v
            conv.weight.grad += CTHETA * d
    return value


class TorchSide:
    """The PyTorch training step of one network, on the same batch as ``setup``."""

    def __init__(self, setup, tdevice):
        self.net, self.convs, self.linear, self.config = torch_twin(setup, tdevice)
        self.regions = setup.model.spp.num_regions
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=LR, momentum=MOMENTUM)
        self.x = torch.from_numpy(setup.x_host).to(tdevice)
        self.y = torch.from_numpy(setup.y_host).to(tdevice)
        self.tdevice = tdevice
        self.label = False   # mark the regularizer and the update for the profiler

    def _update_part(self):
        if self.label:
            return torch.profiler.record_function(UPDATE)
        return contextlib.nullcontext()

    def forward_backward(self):
        """Scores, loss, gradients (data term + regularizer) and the regularizer's value."""
        self.optimizer.zero_grad(set_to_none=False)
        scores = self.net(self.x)
        loss = F.cross_entropy(scores, self.y)
        loss.backward()
        with self._update_part():
            reg = torch_regularizer(self.convs, self.linear, self.config, self.regions)
        return scores, loss, reg

    def step(self):
        self.forward_backward()
        with self._update_part():
            self.optimizer.step()

    def sync(self):
        if self.tdevice.type == "cuda":
            torch.cuda.synchronize()


def set_torch_precision(precision):
    """TF32 for cuBLAS and cuDNN float32 work ("tf32") or strict IEEE float32 ("fp32")."""
    mode = "tf32" if precision == "tf32" else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):   # PyTorch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"


# --------------------------------------------------------------------------- minicompact's variants
def variant_label(algo, graph=False, kernels="on"):
    """A column's name: the algorithm, then " graph" (captured) and " twins" (kernels off)."""
    return algo + (" graph" if graph else "") + (" twins" if kernels == "off" else "")


class Variant:
    """minicompact's training step in one configuration: a convolution algorithm, the step eager
    or captured as a CUDA graph (``graph``), the kernels on or off (``kernels``: "on"/"off").

    Its own ``Setup`` (the same seed, so the same weights and batch as every other variant),
    and its step wrapped in ``CapturedStep`` exactly as ``Trainer`` wraps ``_train_batch``:
    ``capture=False`` steps call the step function directly.  ``step()`` must run inside
    ``kernels_switch(self.kernels)``.
    """

    def __init__(self, net, device, algo, graph, kernels):
        self.algo, self.graph, self.kernels = algo, graph, kernels
        self.label = variant_label(algo, graph, kernels)
        self.setup = Setup(net, device, conv_algo=algo)
        xp = get_array_module(self.setup.x)
        self.captured = CapturedStep(self._train, xp, self._state_arrays, self._set_lr,
                                     capture=check_mode("on" if graph else "off", xp))

    def _train(self, x, y):
        """The step ``Setup.step`` times (forward, loss, backward, regularizer, SGD), returning
        its objective and loss (0-d device arrays): what ``CapturedStep`` captures."""
        s = self.setup
        value, loss, _ = train_step(s.model, s.optimizer, x, y, s.regularizer, softmax_cross_entropy,
                                    check_finite=False)
        return value, loss

    def _set_lr(self, lr):
        self.setup.optimizer.lr = lr

    def _state_arrays(self):
        """Every array a step updates in place (as ``Trainer._state_arrays``)."""
        model = self.setup.model
        return ([a for layer in model.layers for store in (layer.params, layer.buffers)
                 for a in store.values()] + self.setup.optimizer.buffers())

    def step(self):
        """One whole training step: replayed once captured, eager otherwise; no sync inside."""
        self.captured(LR, self.setup.x, self.setup.y)

    @property
    def is_captured(self):
        """Whether replays run (False for an eager variant, or a capture that failed and warned)."""
        return self.captured.graph is not None


# --------------------------------------------------------------------------- the equality check
def rel_err(a, b):
    """max |a - b| / max |b|: the error relative to the array's scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def quantities(setup, side, update=True):
    """One forward and backward (and, if ``update``, one SGD step) in both frameworks.

    Returns two dicts name -> NumPy array, minicompact's and PyTorch's, with the scores, the
    loss, the objective, every gradient, the BN running variances and, after the step, the
    weights.
    """
    model = setup.model
    model.zero_grad()
    value, loss, scores = objective(model, setup.x, setup.y, setup.regularizer)
    t_scores, t_loss, t_reg = side.forward_backward()

    def t(a):
        return a.detach().cpu().numpy()

    W = model.classifier.params["W"]
    ours = {"scores": to_cpu(scores), "loss": to_cpu(loss), "objective": to_cpu(value)}
    theirs = {"scores": t(t_scores), "loss": t(t_loss), "objective": t(t_loss) + t(t_reg)}
    t_bns = [m for m in side.net.features if isinstance(m, torch.nn.BatchNorm2d)]
    for l, (conv, bn, tconv, tbn) in enumerate(zip(model.convs, model.bns, side.convs, t_bns), 1):
        ours.update({f"conv{l} dW": to_cpu(conv.grads["W"]), f"bn{l} dgamma": to_cpu(bn.grads["gamma"]),
                     f"bn{l} dbeta": to_cpu(bn.grads["beta"]),
                     f"bn{l} running_var": to_cpu(bn.buffers["running_var"])})
        theirs.update({f"conv{l} dW": t(tconv.weight.grad), f"bn{l} dgamma": t(tbn.weight.grad),
                       f"bn{l} dbeta": t(tbn.bias.grad), f"bn{l} running_var": t(tbn.running_var)})
    ours["classifier dW"] = to_cpu(model.classifier.grads["W"]).reshape(W.shape[0], -1)
    ours["classifier db"] = to_cpu(model.classifier.grads["b"])
    theirs["classifier dW"], theirs["classifier db"] = t(side.linear.weight.grad), t(side.linear.bias.grad)
    if update:
        setup.optimizer.step()
        side.optimizer.step()
        for l, (conv, tconv) in enumerate(zip(model.convs, side.convs), 1):
            ours[f"conv{l} W after SGD"], theirs[f"conv{l} W after SGD"] = to_cpu(conv.params["W"]), t(tconv.weight)
        ours["classifier W after SGD"] = to_cpu(W).reshape(W.shape[0], -1)
        theirs["classifier W after SGD"] = t(side.linear.weight)
    return ours, theirs


def worst(a, b, only=None):
    """(name, largest relative error) over the names of dict ``a`` (containing ``only``)."""
    errors = [(k, rel_err(a[k], b[k])) for k in a if only is None or only in k]
    return max(errors, key=lambda e: e[1])


def check_equal(args, net, tdevice, conv_algo="im2col"):
    """The two frameworks compute the same thing; returns a dict of the worst errors.

    On the first ``--check-batch`` images, with fresh copies of the network:

    * float64: every quantity of ``quantities`` (every gradient, the SGD step) must agree to
      ``--tol64``: the same function, the same gradients, the same update;
    * float32: the scores and the loss must agree to ``--tol``.  The gradients are reported,
      each framework's float32 against its own float64: float32 rounding, amplified through
      eleven batch-norms, can move a gradient by far more than its last bit, differently in
      the two.  An error near 1e-2 in one dW is a kink decided differently (a max-pool
      window whose two largest inputs, or a ReLU input and zero, closer than float32's
      rounding), which routes one gradient to another pixel: perturbing depth 8's float32
      images by one unit in the last place gave 1.7e-2 in conv4 dW in 3 of 7 trials and
      ~4e-6 otherwise, and PyTorch shows the same (docs/gpu.md).
    """
    small = dict(net, batch=min(net["batch"], args.check_batch))
    runs = {}
    for dtype in (np.float64, np.float32):
        setup = Setup(small, args.device, dtype=dtype, conv_algo=conv_algo)
        runs[dtype] = quantities(setup, TorchSide(setup, tdevice))
    (ours64, theirs64), (ours32, theirs32) = runs[np.float64], runs[np.float32]
    name, worst64 = worst(ours64, theirs64)
    if not worst64 <= args.tol64:
        raise AssertionError(f"minicompact and PyTorch differ in float64 in {name}: relative error "
                             f"{worst64:.2e} > {args.tol64:g}")
    forward32 = max(rel_err(ours32[k], theirs32[k]) for k in ("scores", "loss"))
    if not forward32 <= args.tol:
        raise AssertionError(f"minicompact and PyTorch scores or loss differ in float32 by "
                             f"{forward32:.2e} > {args.tol:g}")
    return {"float64_worst": worst64, "float64_worst_is": name, "float32_forward": forward32,
            "float32_gradients_between": worst(ours32, theirs32, " d")[1],
            "minicompact_float32_vs_float64": worst(ours32, ours64, " d")[1],
            "minicompact_float32_worst_is": worst(ours32, ours64, " d")[0],
            "torch_float32_vs_float64": worst(theirs32, theirs64, " d")[1],
            "torch_float32_worst_is": worst(theirs32, theirs64, " d")[0]}


# --------------------------------------------------------------------------- per layer kind
UPDATE = "regularizer + SGD"   # the record_function label of that part of the PyTorch step


def torch_kind(name):
    """The minicompact layer kind a PyTorch operator (or autograd node) belongs to."""
    n = name.lower().replace("autograd::engine::evaluate_function: ", "").replace("_", "")
    for kind, keys in (("SpatialPyramidPool", ("adaptivemaxpool",)), ("MaxPool2D", ("maxpool",)),
                       ("Conv2D", ("conv",)), ("BatchNorm2D", ("batchnorm",)),
                       ("ReLU", ("relu", "thresholdbackward")),
                       ("loss", ("crossentropy", "logsoftmax", "nllloss"))):
        if any(k in n for k in keys):
            return kind
    if n in ("aten::addmm", "aten::mm", "aten::linear", "aten::t", "addmmbackward0", "tbackward0"):
        return "SoftmaxClassifier"
    return "other"


def torch_layer_times(side, steps=2):
    """Seconds per step by kind of layer from PyTorch's profiler: the self time of every
    operator (CPU time on the CPU, its kernels' time on the GPU), over ``steps`` steps after
    one warm-up; the regularizer and the SGD update are labelled with ``record_function``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = side.tdevice.type == "cuda"
    side.step()
    side.sync()
    side.label = True
    try:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(steps):
                side.step()
            side.sync()
    finally:
        side.label = False
    per_kind = {}
    for evt in prof.events():
        if evt.device_type != DeviceType.CPU:
            continue   # GPU kernels count through the operators that launched them
        us = evt.self_device_time_total if cuda else evt.self_cpu_time_total
        kind, parent = None, evt
        while parent is not None and kind is None:   # inside the labelled update?
            kind = UPDATE if parent.name == UPDATE else None
            parent = parent.cpu_parent
        kind = kind or torch_kind(evt.name)
        per_kind[kind] = per_kind.get(kind, 0.0) + us * 1e-6 / steps
    return per_kind


# --------------------------------------------------------------------------- peak memory
def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(args):
    """Run in a fresh process: two steps of one framework; print one JSON line of peaks."""
    net, device = dict(NETWORKS[args.net]), args.device
    if args.batch:
        net["batch"] = args.batch
    set_precision(args.precision)
    setup = Setup(net, device, conv_algo=args.conv_algo)
    side = None
    if args.memory_child == "torch":
        torch.set_num_threads(args.threads)
        side = TorchSide(setup, torch.device("cuda" if device == "gpu" else "cpu"))
        setup.model.release_caches()
    step = setup.step if side is None else side.step
    out = {}
    if device == "gpu":
        if side is None:
            import cupy
            pool = cupy.get_default_memory_pool()
            peak = [pool.used_bytes()]

            def malloc(size):
                mem = pool.malloc(size)
                peak[0] = max(peak[0], pool.used_bytes())
                return mem
            cupy.cuda.set_allocator(malloc)
            for _ in range(2):
                step()
            cupy.cuda.Device().synchronize()
            out = {"peak_in_use": peak[0], "reserved": pool.total_bytes()}
        else:
            torch.cuda.reset_peak_memory_stats()
            for _ in range(2):
                step()
            torch.cuda.synchronize()
            out = {"peak_in_use": torch.cuda.max_memory_allocated(),
                   "reserved": torch.cuda.max_memory_reserved()}
    else:
        # One step first, so that one-time library allocations (BLAS buffers, thread pools)
        # are not counted; then what forward keeps for backward is dropped, and the peak is
        # measured over two steps above the weights, gradients and momentum.
        step()
        setup.model.release_caches()
        with open("/proc/self/clear_refs", "w") as f:   # reset VmHWM to the current RSS
            f.write("5")
        base = _rss_kib("VmRSS")
        for _ in range(2):
            step()
        out = {"peak_rss_growth": 1024 * (_rss_kib("VmHWM") - base)}
    print(json.dumps(out))


def measure_memory(args, net_name, framework, conv_algo="im2col", kernels="on"):
    """Peaks of ``framework`` ("minicompact" or "torch") on one network, in a fresh process
    (minicompact with its kernels on or off: ``MINICOMPACT_KERNELS``)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child",
           "torch" if framework == "torch" else "minicompact", "--net", net_name,
           "--conv-algo", conv_algo,
           "--device", args.device, "--precision", args.precision, "--threads", str(args.threads)]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    # A fixed mmap threshold: freed large arrays go back to the OS at once in both frameworks,
    # instead of glibc's adaptive threshold keeping some in the heap (and out of the peak).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MINICOMPACT_KERNELS=kernels)
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if run.returncode != 0:
        return {"error": (run.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(run.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the environment
def environment(args, tdevice):
    """Device, driver and library versions, threads and load, as a dict."""
    env = {"python": platform.python_version(), "numpy": np.__version__,
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "cpu": _cpu_name(), "cores": os.cpu_count(), "load_avg": os.getloadavg(),
           "precision": args.precision, "cuda_graph": args.cuda_graph, "kernels": args.kernels}
    blas = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
    env["numpy_blas"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    env["blas_threads_env"] = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                          "MKL_NUM_THREADS") if k in os.environ}
    if args.device == "gpu":
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        env.update(cupy=cupy.__version__, gpu=name.decode() if isinstance(name, bytes) else str(name),
                   cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
                   cuda_driver=cupy.cuda.runtime.driverGetVersion(),
                   torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   cudnn_benchmark=torch.backends.cudnn.benchmark)
        try:
            env["nvidia_driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            env["nvidia_driver"] = "nvidia-smi not found"
    return env


def cupy_compute_type():
    """What CuPy will use for float32 GEMMs now (e.g. COMPUTE_TYPE_TF32), to verify the switch."""
    try:
        from cupy._core import _routines_linalg as linalg
        return linalg.compute_type_to_str(linalg.get_compute_type(np.float32))
    except Exception as exc:   # a private API: report, never fail on it
        return f"unknown ({type(exc).__name__})"


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


# --------------------------------------------------------------------------- main
def bench_network(args, name, tdevice):
    """Check, time, attribute and measure one network; return a dict of results."""
    net = dict(NETWORKS[name])
    if args.batch:
        net["batch"] = args.batch
    result = {"net": name, "config": net}
    print(f"\n== {name}: {describe(net)}")
    set_precision("fp32")
    set_torch_precision("fp32")
    algos, graphs, kmodes = args.conv_algos, args.graph_modes, args.kernel_modes
    eager_keys = [(algo, k) for algo in algos for k in kmodes]   # one check, layer pass each
    if not args.no_check:
        for algo, k in eager_keys:
            key = variant_label(algo, kernels=k)
            with kernels_switch(k):
                c = check_equal(args, net, tdevice, algo)
            result.setdefault("check", {})[key] = c
            print(f"   [{key}] same computation (batch {min(net['batch'], args.check_batch)}): in "
                  f"float64 the scores, loss, objective, every gradient, BN statistics and the weights "
                  f"after one SGD step agree to {c['float64_worst']:.1e} (worst: {c['float64_worst_is']}); "
                  f"in float32 the scores and loss to {c['float32_forward']:.1e}; float32 gradients "
                  f"against each framework's own float64: minicompact "
                  f"{c['minicompact_float32_vs_float64']:.1e} ({c['minicompact_float32_worst_is']}), "
                  f"PyTorch {c['torch_float32_vs_float64']:.1e} ({c['torch_float32_worst_is']})"
                  f" (between the two: {c['float32_gradients_between']:.1e})")
    variants = [Variant(net, args.device, algo, graph, k)    # same weights and batch in each
                for algo in algos for graph in graphs for k in kmodes]
    side = TorchSide(variants[0].setup, tdevice)
    set_precision(args.precision)
    set_torch_precision(args.precision)
    if args.device == "gpu":
        result["cupy_float32_gemm"] = cupy_compute_type()
    for v in variants:
        if v.graph:   # the first full batch: an eager step, the capture and one checked replay
            with kernels_switch(v.kernels):
                v.step()
            synchronize()
            print(f"   [{v.label}] " + ("captured as a CUDA graph; one replay reproduced the eager step"
                                        if v.is_captured else
                                        "capture FAILED (see the warning above): its steps run eagerly"))
    for _ in range(args.warmup):
        for v in variants:
            with kernels_switch(v.kernels):
                v.step()
            side.step()
    ours, theirs = {v.label: [] for v in variants}, []

    def pause():
        # After a step, OpenBLAS's and OpenMP's idle threads spin for a while; with several
        # threads on few cores they would steal the next framework's cores (measured on 2
        # cores: PyTorch's demo step 159 ms right after a minicompact step, 74 ms alone).
        if args.pause > 0:
            time.sleep(args.pause)

    for _ in range(args.repeats):   # alternate, so that load changes hit both alike
        for v in variants:
            pause()
            with kernels_switch(v.kernels):
                ours[v.label].append(timed(v.step, synchronize))
            pause()
            theirs.append(timed(side.step, side.sync))
    batch = net["batch"]
    theirs_ips = batch / float(np.median(theirs))
    result.update(torch_img_s=theirs_ips, torch_step_ms=[1e3 * t for t in theirs], algos={})
    for v in variants:
        ours_ips = batch / float(np.median(ours[v.label]))
        result["algos"][v.label] = dict(conv_algo=v.algo, cuda_graph=v.graph, captured=v.is_captured,
                                        kernels=v.kernels, minicompact_img_s=ours_ips,
                                        ratio=ours_ips / theirs_ips,
                                        minicompact_step_ms=[1e3 * t for t in ours[v.label]])
        print(f"   [{v.label}] whole step, median of {args.repeats}: minicompact "
              f"{1e3 * np.median(ours[v.label]):8.1f} ms = {ours_ips:7.1f} img/s | PyTorch "
              f"{1e3 * np.median(theirs):8.1f} ms = {theirs_ips:7.1f} img/s (median of "
              f"{len(theirs)}) | ratio {ours_ips / theirs_ips:.2f}"
              + ("" if v.is_captured or not v.graph else " (not captured: eager)"))
    # (on the CPU kernels and twins are the same code: no ratio of them)
    speedups = speedup_lines(result["algos"], algos, graphs, kmodes if args.device == "gpu" else kmodes[:1])
    if speedups:
        result["speedups"] = speedups
        for line in speedups.values():
            print(f"   {line}")
    if not args.no_layers:
        first = {}   # the first variant of each (algo, kernels): eager where there is one
        for v in variants:
            first.setdefault((v.algo, v.kernels), v)
        mine = {}
        for (algo, k), v in first.items():
            with kernels_switch(k):
                mine[variant_label(algo, kernels=k)] = layer_times(v.setup, steps=args.layer_steps)
        try:
            other = torch_layer_times(side, steps=args.layer_steps)
        except Exception as exc:   # the profiler is a nicety: never lose the run to it
            other = {}
            print(f"   (PyTorch profiler failed: {type(exc).__name__}: {exc})")
        result["layers"] = {"minicompact_s": mine, "torch_s": other}
        print("   per layer kind, ms per step (minicompact: a separate pass with a sync after every "
              "layer, eager; PyTorch: profiler self time per operator)")
        keys = list(mine)
        width = max([11] + [len(k) + 1 for k in keys])
        print(f"     {'':<20s} " + " ".join(f"{k:>{width}s}" for k in keys) + f" {'PyTorch':>9s}")
        first_times = mine[keys[0]]
        kinds = sorted(set().union(*mine.values(), other), key=lambda k: -first_times.get(k, 0.0))
        for kind in kinds:
            cells = [mine[k].get(kind) for k in keys] + [other.get(kind)]
            print(f"     {kind:<20s} " + " ".join(
                f"{'' if t is None else f'{1e3 * t:.2f}':>{width if i < len(keys) else 9}s}"
                for i, t in enumerate(cells)))
    if not args.no_memory:
        variants = side = v = first = None   # free the device memory before the children measure
        k = kmodes[0]
        mem = {f"minicompact {variant_label(algo, kernels=k)}": measure_memory(args, name, "minicompact", algo, k)
               for algo in algos}
        mem["torch"] = measure_memory(args, name, "torch")
        result["memory"] = mem
        print(f"   peak memory over two eager steps, fresh process each: {format_memory(mem, args.device)}")
    return result


def speedup_lines(timings, algos, graphs, kmodes):
    """{name: one line} of the step-time ratios within an algorithm: eager / captured (for each
    kernels setting) and twins / kernels (for each of eager and captured); above 1, the
    second is faster.  Empty when only one variant per algorithm was timed."""
    def ms(algo, graph, k):
        return float(np.median(timings[variant_label(algo, graph, k)]["minicompact_step_ms"]))

    lines = {}
    for algo in algos:
        parts = []
        if len(graphs) == 2:
            parts.append("eager / captured " + ", ".join(
                (f"{ms(algo, False, k) / ms(algo, True, k):.2f}"
                 if timings[variant_label(algo, True, k)]["captured"] else "none (capture failed)")
                + f" ({'kernels' if k == 'on' else 'twins'})" for k in kmodes))
        if len(kmodes) == 2:
            parts.append("twins / kernels " + ", ".join(
                f"{ms(algo, g, 'off') / ms(algo, g, 'on'):.2f} ({'captured' if g else 'eager'})"
                for g in graphs))
        if parts:
            lines[algo] = f"[{algo}] step time ratios (above 1: the second is faster): " + "; ".join(parts)
    return lines


def format_memory(mem, device):
    def gib(b):
        return f"{b / 2**30:.2f} GiB"
    parts = []
    for fw, m in mem.items():
        if "error" in m:
            parts.append(f"{fw}: failed ({m['error']})")
        elif device == "gpu":
            parts.append(f"{fw}: {gib(m['peak_in_use'])} peak in use, {gib(m['reserved'])} reserved")
        else:
            parts.append(f"{fw}: +{gib(m['peak_rss_growth'])} peak RSS")
    return "; ".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32"])
    ap.add_argument("--nets", default=",".join(NETWORKS),
                    help=f"comma-separated, from {', '.join(NETWORKS)}")
    ap.add_argument("--batch", type=int, help="override every network's batch size")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per framework")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per framework first")
    ap.add_argument("--layer-steps", type=int, default=2, help="steps of the per-layer pass")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch's CPU threads")
    ap.add_argument("--tol", type=float, default=1e-4,
                    help="largest relative error (max|a-b|/max|b|) of float32 scores and loss")
    ap.add_argument("--tol64", type=float, default=1e-9,
                    help="largest relative error of every float64 quantity compared")
    ap.add_argument("--check-batch", type=int, default=8, help="batch size of the float64 check")
    ap.add_argument("--pause", type=float,
                    help="seconds of sleep before each timed step, so that the other framework's "
                         "spinning threads are idle (default: 0.5 on the CPU with more than one "
                         "thread, else 0)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-layers", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--conv-algo", default="im2col,winograd",
                    help="minicompact's convolution algorithms to time, comma-separated, from "
                         "im2col, winograd, auto (one column each); append +shared for one column "
                         "workspace shared by all layers, columns rebuilt in backward")
    ap.add_argument("--cuda-graph", default="off", choices=["off", "on", "both"],
                    help="time minicompact's step eager (off), captured once as a CUDA graph and "
                         "replayed (on: GPU only), or both; on the CPU 'both' times eager only")
    ap.add_argument("--kernels", default="on", choices=["on", "off", "both"],
                    help="minicompact's hand-written CUDA kernels (on), their array-expression twins "
                         "(off: MINICOMPACT_KERNELS=off), or both; the same code on the CPU")
    ap.add_argument("--json", metavar="PATH", help="also write the results here")
    ap.add_argument("--net", help=argparse.SUPPRESS)            # for --memory-child
    ap.add_argument("--memory-child", choices=["minicompact", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if torch is None:
        ap.exit(2, "bench_vs_pytorch.py: error: PyTorch is not installed (pip install torch); "
                   "only this benchmark needs it\n")
    if args.device == "gpu" and not backend.gpu_available():
        ap.exit(2, "bench_vs_pytorch.py: error: --device gpu needs CuPy and a CUDA GPU\n")
    if args.device == "gpu" and not torch.cuda.is_available():
        ap.exit(2, "bench_vs_pytorch.py: error: this PyTorch build sees no CUDA GPU\n")
    args.conv_algos = [a.strip() for a in args.conv_algo.split(",") if a.strip()]
    bad = [a for a in args.conv_algos
           if a.replace("+shared", "", 1) not in ("im2col", "winograd", "auto")]
    if bad or not args.conv_algos:
        ap.exit(2, f"bench_vs_pytorch.py: error: --conv-algo takes im2col, winograd and/or auto, "
                   f"got {args.conv_algo!r}\n")
    if args.memory_child:
        return memory_child(args)
    args.kernel_modes = ["on", "off"] if args.kernels == "both" else [args.kernels]
    args.graph_modes = {"off": [False], "on": [True], "both": [False, True]}[args.cuda_graph]
    if args.device == "cpu" and args.cuda_graph == "on":
        ap.exit(2, "bench_vs_pytorch.py: error: --cuda-graph on needs a GPU (--device gpu); "
                   "'--cuda-graph both' on the CPU times the eager step only\n")
    if args.device == "gpu" and args.cuda_graph != "off":
        try:
            check_mode("on", array_module("gpu"))
        except ValueError as exc:
            ap.exit(2, f"bench_vs_pytorch.py: error: {exc}\n")
    notes = []
    if args.device == "cpu" and args.cuda_graph == "both":
        args.graph_modes = [False]
        notes.append("--cuda-graph both: the CPU has no CUDA graphs, so only the eager step is timed")
    if args.device == "cpu" and args.kernels != "on":
        notes.append(f"--kernels {args.kernels}: on the CPU every kernel is its NumPy twin, so kernels "
                     "and twins run the same code")
    names = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in names if n not in NETWORKS]
    if unknown:
        ap.exit(2, f"bench_vs_pytorch.py: error: unknown network(s) {unknown}; choose from {list(NETWORKS)}\n")
    torch.set_num_threads(args.threads)
    if args.pause is None:
        args.pause = 0.5 if args.device == "cpu" and args.threads > 1 else 0.0
    tdevice = torch.device("cuda" if args.device == "gpu" else "cpu")
    env = environment(args, tdevice)
    print("environment: " + json.dumps(env))
    for note in notes:
        print(note)
    print(f"timing: {args.warmup} warm-up + {args.repeats} timed whole steps per framework, "
          f"alternating{f', {args.pause:g} s of sleep before each' if args.pause else ''}; "
          f"ratio = minicompact img/s / PyTorch img/s")
    labels = [variant_label(a, g, k) for a in args.conv_algos for g in args.graph_modes
              for k in args.kernel_modes]
    if labels != args.conv_algos:
        print("columns: the convolution algorithm, then 'graph': the step captured as a CUDA graph "
              "and replayed, 'twins': MINICOMPACT_KERNELS=off (else eager, kernels on)")
    results = []
    t0 = time.time()
    for name in names:
        results.append(bench_network(args, name, tdevice))
    labels = list(results[0]["algos"]) if results else labels   # the columns timed
    width = max([15] + [len(a) + 7 for a in labels])
    print(f"\n{'network':<9s} {'batch':>5s} " + " ".join(f"{a + ' img/s':>{width}s}" for a in labels)
          + f" {'PyTorch img/s':>14s} " + " ".join(f"{'ratio ' + a:>{width}s}" for a in labels))
    for r in results:
        mc = r["algos"]
        print(f"{r['net']:<9s} {r['config']['batch']:>5d} "
              + " ".join(f"{mc[a]['minicompact_img_s']:>{width}.1f}" for a in labels)
              + f" {r['torch_img_s']:>14.1f} " + " ".join(f"{mc[a]['ratio']:>{width}.2f}" for a in labels))
    print(f"({args.device}, {args.precision}, PyTorch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f} at the end, {time.time() - t0:.0f} s in all)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
