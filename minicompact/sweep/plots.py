"""A sweep's table and figures: results.csv, the paper's Figs. 6-9 and summary.md.

* heatmap.png (Fig. 6): CompactNet's single-crop top-1 error over depth × ρ;
* best_per_depth.png (Fig. 7): each model's lowest error at each depth (its best ρ);
* gap.png (Fig. 8): validation minus training error of those best points;
* pareto.png (Fig. 9): error against structural effective parameters, every point, with the
  operation modes of sec. 5.3.2 marked: B (best), C (fewest parameters within ``near`` points
  of the best error), M (fewest parameters matching another model's best);

Figs. 6-8 draw the CompactNet points (over depth); Fig. 9 and the summary draw every point,
a VGG11's or ResNet18's as a series of its own ("resnet18-compact", ``points.series``).
* summary.md: the best point per model, the operation modes, and every point's row.

Figures are matplotlib ``Figure`` objects written by ``plots.save_png``.
"""
import os

from matplotlib.figure import Figure

from ..system.atomic import atomic_write
from ..training.plots import save_png
from .points import SweepError, operation_modes, point_dir, point_state, read_point, series, write_results

COLOURS = {"compact": "tab:red", "compressed": "tab:blue", "simple": "tab:green"}
NAMES = {"compact": "CompactNet", "compressed": "CompressedNet", "simple": "SimpleNet"}


def _save(fig, path):
    """``plots.save_png`` after ``tight_layout``; returns the file's name (for the summary line)."""
    fig.tight_layout()
    return os.path.basename(save_png(fig, path))


def best_per_depth(rows):
    """{model: {depth: row}}: the lowest-error row of each model at each depth."""
    out = {}
    for r in rows:
        d = out.setdefault(r["model"], {})
        if r["depth"] not in d or r["val_top1_error"] < d[r["depth"]]["val_top1_error"]:
            d[r["depth"]] = r
    return out


def heatmap(rows, path):
    """Fig. 6: CompactNet's error over depth (rows) × ρ (columns); None without CompactNet points."""
    compact = [r for r in rows if r["model"] == "compact"]
    if not compact:
        return None
    depths = sorted({r["depth"] for r in compact})
    rhos = sorted({r["rho"] for r in compact})
    grid = [[float("nan")] * len(rhos) for _ in depths]
    for r in compact:
        grid[depths.index(r["depth"])][rhos.index(r["rho"])] = r["val_top1_error"]
    fig = Figure(figsize=(1.2 * len(rhos) + 3, 0.6 * len(depths) + 2))
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="RdYlBu", aspect="auto", origin="lower")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize="small")
    ax.set_xticks(range(len(rhos)), [f"{r:g}" for r in rhos])
    ax.set_yticks(range(len(depths)), [str(d) for d in depths])
    ax.set_xlabel("ρ")
    ax.set_ylabel("depth L")
    ax.set_title("CompactNet top-1 error (%), single crop (Fig. 6)")
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def _per_depth_lines(rows, path, value, ylabel, title):
    """Figs. 7 and 8: ``value`` of each model's best row per depth; None without rows."""
    if not rows:
        return None
    best = best_per_depth(rows)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for model, by_depth in best.items():
        depths = sorted(by_depth)
        ax.plot(depths, [value(by_depth[d]) for d in depths], "o-", color=COLOURS.get(model),
                label=NAMES.get(model, model))
    ax.set_xlabel("depth L")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def mode_labels(modes):
    """Fig. 9's marks: (model, row, "CompactNet: B, C, M(Simp)") once per marked point, all
    the modes that landed on that point in one label (``modes``: ``operation_modes``)."""
    out = []
    for model, m in modes.items():
        marks = [("B", m["B"])] + ([("C", m["C"])] if "C" in m else [])
        marks += [(f"M({NAMES[o][:4] if o in NAMES else o})", r) for o, r in m.get("M", {}).items()]
        labels = {}
        for label, r in marks:
            labels.setdefault(r["point"], (r, []))[1].append(label)
        out += [(model, r, f"{NAMES.get(model, model)}: {', '.join(names)}") for r, names in labels.values()]
    return out


def pareto(rows, modes, path):
    """Fig. 9: error against structural effective parameters, B/C/M marked."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for model in sorted({series(r) for r in rows}):
        rs = [r for r in rows if series(r) == model]
        ax.scatter([r["structural_params"] for r in rs], [r["val_top1_error"] for r in rs], s=18,
                   alpha=0.5, color=COLOURS.get(model), label=NAMES.get(model, model))
    # Each label on its own line of text, so that nearby points' labels never overlap.
    for row, (model, r, text) in enumerate(mode_labels(modes), 1):
        ax.scatter([r["structural_params"]], [r["val_top1_error"]], s=80, facecolors="none",
                   edgecolors=COLOURS.get(model))
        ax.annotate(text, (r["structural_params"], r["val_top1_error"]), textcoords="offset points",
                    xytext=(6, 10 * row - 4), fontsize="x-small", color=COLOURS.get(model))
    ax.set_xlabel("structural effective parameters")
    ax.set_ylabel("top-1 error (%), single crop")
    ax.set_title("Operation modes (Fig. 9): B best, C compressed, M performance match")
    ax.legend()
    return _save(fig, path)


def summary(rows, modes, total_points, path):
    from .points import FIELDS
    lines = ["# Sweep summary\n", f"{len(rows)} of {total_points} points finished.\n",
             "## Operation modes (sec. 5.3.2)\n",
             "| model | mode | point | top-1 error 1 / 10 crops | structural params (of total) |",
             "|---|---|---|---|---|"]
    for model, m in modes.items():
        marks = [("B", m["B"])] + ([("C", m["C"])] if "C" in m else [])
        marks += [(f"M (matches {NAMES.get(o, o)})", r) for o, r in m.get("M", {}).items()]
        for label, r in marks:
            lines.append(f"| {NAMES.get(model, model)} | {label} | {r['point']} | {r['val_top1_error']:.1f} % / "
                         f"{r['val_top1_error_10crop']:.1f} % | {r['structural_params']:,} ({r['total_params']:,}) |")
    lines += ["\n## Every point\n", "| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in FIELDS) + " |")
    with atomic_write(path) as f:
        f.write("\n".join(lines) + "\n")
    return os.path.basename(path)


def collect(sweep, points, near=2.0):
    """Read every finished point of ``points`` and write the table and figures into ``sweep``.

    Returns {"finished": count, "files": names written, "unreadable": one line per finished
    point whose files could not be read (left out of the table)}.
    """
    rows, unreadable = [], []
    for p in points:
        if point_state(point_dir(sweep, p["name"])) == "done":
            try:
                rows.append(read_point(point_dir(sweep, p["name"]), p))
            except SweepError as exc:
                unreadable.append(str(exc))
    files = []
    write_results(os.path.join(sweep, "results.csv"), rows)
    files.append("results.csv")
    if rows:
        modes = operation_modes(rows, near)
        compactnets = [r for r in rows if r["arch"] == "compactnet"]   # Figs. 6-8 are over depth
        for name in (heatmap(compactnets, os.path.join(sweep, "heatmap.png")),
                     _per_depth_lines(compactnets, os.path.join(sweep, "best_per_depth.png"),
                                      lambda r: r["val_top1_error"], "top-1 error (%)",
                                      "Best error per depth, ρ tuned (Fig. 7)"),
                     _per_depth_lines([r for r in compactnets if r["train_top1_error"] != ""],
                                      os.path.join(sweep, "gap.png"),
                                      lambda r: r["val_top1_error"] - r["train_top1_error"],
                                      "val − train top-1 error (points)", "Generalization gap (Fig. 8)"),
                     pareto(rows, modes, os.path.join(sweep, "pareto.png")),
                     summary(rows, modes, len(points), os.path.join(sweep, "summary.md"))):
            if name:
                files.append(name)
    return {"finished": len(rows), "files": files, "unreadable": unreadable}
