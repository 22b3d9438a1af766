"""Running sums that stay on the device, so that a training loop never waits for the GPU.

A GPU runs its work queue behind the host's back; Python reading a value of a GPU array
(``float(x)``, ``int(x)``, ``x.item()``, ``to_cpu(x)``) has to wait until the GPU has finished
everything queued before it: a *sync*.  A sync per step — for a loss to print, an accuracy to
count — leaves the GPU idle while the host catches up and queues the next step.  So the loop
adds each step's values into a small array on the device (a few tiny kernels, no waiting) and
reads them all at once, one transfer, when it has something to log.  On the CPU the same code
costs nothing.
"""
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
