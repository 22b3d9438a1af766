"""Running sums that stay on the device, so that a training loop never waits for the GPU.

A GPU runs its work queue behind the host's back; Python reading a value of a GPU array
(``float(x)``, ``int(x)``, ``x.item()``, ``to_cpu(x)``) has to wait until the GPU has finished
everything queued before it: a *sync*.  A sync per step — for a loss to print, an accuracy to
count — leaves the GPU idle while the host catches up and queues the next step.  So the loop
adds each step's values into a small array on the device (a few tiny kernels, no waiting) and
reads them all at once, one transfer, when it has something to log.  On the CPU the same code
costs nothing.
"""
import time

import numpy as np

from ..backend import to_cpu


class DeviceSums:
    """Named float64 sums on one device: ``add`` queues, ``read`` brings them to the host.

    xp: the array module (numpy or cupy) of the device; names: the sums, in a fixed order;
    start: optional dict name -> Python number to start from (a resumed epoch's sums).
    """

    def __init__(self, xp, names, start=None):
        self.xp, self.names = xp, tuple(names)
        start = start or {}
        self.total = xp.asarray(np.array([float(start.get(k, 0.0)) for k in self.names]))

    def add(self, **values):
        """total[name] += value for every name (0-d device arrays or numbers); no sync."""
        xp = self.xp
        if set(values) != set(self.names):
            raise ValueError(f"DeviceSums.add needs exactly {self.names}, got {tuple(values)}")
        self.total += xp.stack([xp.asarray(values[k], dtype=np.float64) for k in self.names])

    def read(self):
        """The sums as a dict name -> Python float: one device→host transfer (a sync on a GPU)."""
        return dict(zip(self.names, to_cpu(self.total).tolist()))


class EpochSums:
    """One training epoch's running statistics, resumable mid-epoch.

    ``partial``: the sums a checkpoint saved part-way through this epoch (None: a fresh
    epoch), already the whole group's, so only rank 0 starts from them (``is_root``).  The
    per-step values stay on the device (``DeviceSums``); ``n`` (this rank's image count),
    the wall time and the skipped files are kept on the host.
    """

    NAMES = ("loss", "objective", "top1", "top5")

    def __init__(self, xp, partial=None, is_root=True):
        self.saved = partial or {"loss": 0.0, "objective": 0.0, "top1": 0, "top5": 0, "n": 0,
                                 "seconds": 0.0, "skipped": []}
        mine = self.saved if is_root else {}
        self.device = DeviceSums(xp, self.NAMES, start=mine)
        self.n = int(mine.get("n", 0))
        self.t0 = time.perf_counter()

    def add(self, loss, objective, top1, top5, n):
        """Add one step: its mean loss and objective (weighted by its ``n`` images), top-k counts."""
        self.device.add(loss=loss * n, objective=objective * n, top1=top1, top5=top5)
        self.n += n

    def elapsed(self, now):
        """Seconds spent in this epoch up to ``now``, including those before a resume."""
        return self.saved["seconds"] + now - self.t0

    def paused(self, host, skipped_files):
        """The dict a checkpoint stores to resume here: the group's sums ``host`` so far."""
        sums = self.saved
        sums.update(host, top1=int(host["top1"]), top5=int(host["top5"]), n=int(host["n"]))
        sums["seconds"] += time.perf_counter() - self.t0
        sums["skipped"] = sums["skipped"] + skipped_files
        return sums

    def finished(self, host, skipped_files):
        """The epoch's statistics from the group's final sums ``host``."""
        sums = self.saved
        sums["seconds"] += time.perf_counter() - self.t0
        sums["skipped"] = sums["skipped"] + skipped_files
        n = max(int(host["n"]), 1)
        return {"loss": host["loss"] / n, "objective": host["objective"] / n,
                "train_top1": host["top1"] / n, "train_top5": host["top5"] / n,
                "images_per_s": int(host["n"]) / max(sums["seconds"], 1e-9), "seconds": sums["seconds"],
                "skipped": len(sums["skipped"]), "skipped_files": sums["skipped"][:20]}
