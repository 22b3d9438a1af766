"""The progress bar of a training epoch (tqdm), or nothing when it is off.

Drawn only by rank 0 and only on a terminal (run.py decides); the figures it shows come from
the running sums the loop reads once per log interval, so drawing it costs no device sync.
"""
try:
    from tqdm import tqdm  # the text bar: run.py draws it only on a terminal
except ImportError:  # pragma: no cover - tqdm is in requirements.txt
    tqdm = None


class ProgressBar:
    """``with ProgressBar(on, steps, start, desc) as bar: bar.update(step); bar.show(sums, s)``."""

    def __init__(self, enabled, total, initial=0, desc=""):
        self.bar = None
        if enabled and tqdm is not None:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=False,
                            dynamic_ncols=True)

    def show(self, host, elapsed):
        """Mean loss, accuracy and images/s from the group's sums ``host`` after ``elapsed`` s."""
        if self.bar is not None:
            seen = max(host["n"], 1)
            self.bar.set_postfix(loss=f"{host['loss'] / seen:.3f}", acc=f"{100 * host['top1'] / seen:.1f}%",
                                 img_s=f"{host['n'] / max(elapsed, 1e-9):.0f}", refresh=False)

    def update(self, step):
        """The bar now stands at batch ``step`` (skipped batches included)."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
