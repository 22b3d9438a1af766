#!/usr/bin/env python3
"""Train and evaluate a CompactNet, CompressedNet or SimpleNet on ImageNet-style folders.

    python run.py --depth 12 --rho 0.03                      # the embedded default (no data needed)
    python run.py --data ~/imagenet --depth 12 --rho 0.03    # ROOT/train/<class>/*, ROOT/val/<class>/*
    python run.py --evaluate runs/x/last.npz                 # evaluate a checkpoint only

Without ``--data`` a small procedurally drawn image-folder dataset is generated once (cached)
and a small preset trains on it in a few minutes on a laptop CPU. With ``--data`` the defaults
are the paper's (sec. 5.1). Every flag given explicitly overrides the defaults of either.
"""
import argparse
import os
import sys
import time
import warnings

# Settings of the paper (sec. 5.1, 5.2, 5.3.1), used with --data.
PAPER = dict(epochs=90, batch_size=256, lr=0.1, momentum=0.9, lr_step=30, warmup=0.0,
             image_size=224, width_mult=1.0, stem="auto", workers=None)
# The embedded default: a 2-core CPU must finish `python run.py --depth 12 --rho 0.03` in
# under 5 minutes. Small images and widths (8/16/32 filters); batch 32 with the paper's rate
# scaled linearly to it (0.1 · 32/256 ≈ 0.01) and two epochs of warmup. Measured on the demo
# data: lr 0.1 without warmup is still at chance after one epoch, and 0.02 with one warmup
# epoch stalled at chance on 3 of 4 seeds (see README).
PRESET = dict(epochs=10, batch_size=32, lr=0.01, momentum=0.9, lr_step=8, warmup=2.0,
              image_size=32, width_mult=0.0625, stem="auto", workers=None)
# Settings that change the arithmetic: a resumed run takes them from its checkpoint.
MATH_KEYS = ("depth", "rho", "model", "batch_size", "lr", "momentum", "lr_step", "warmup", "cw",
             "ctheta", "image_size", "width_mult", "stem", "reg_update", "loss", "seed",
             "compressed_beta", "cache")


def build_parser():
    p = argparse.ArgumentParser(
        prog="run.py", description="Train and evaluate CompactNets (Lobel, Vidal & Soto 2019) on "
        "ImageNet-style folders ROOT/train/<class>/*, ROOT/val/<class>/*.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data", metavar="ROOT", help="dataset root with train/ and val/ class folders; "
      "omitted: a generated demo dataset and a small preset (see README)")
    a("--depth", type=int, default=12, help="number of layers L (L-1 feature layers + classifier); paper's best: 12")
    a("--rho", type=float, default=0.03, help="regularization strength ρ = α = β_{L-1}; paper's best: 0.03")
    a("--model", choices=("compact", "compressed", "simple"), default="compact",
      help="CompactNet (Ω+Γ), CompressedNet (Ψ, β=0.1) or SimpleNet (ℓ2 only)")
    a("--epochs", type=int, help=f"training epochs (paper: {PAPER['epochs']}; demo: {PRESET['epochs']})")
    a("--batch-size", type=int, help=f"images per SGD step (paper: {PAPER['batch_size']}; demo: {PRESET['batch_size']})")
    a("--lr", type=float, help=f"initial learning rate (paper: {PAPER['lr']}; demo: {PRESET['lr']})")
    a("--momentum", type=float, help="SGD momentum (paper: 0.9)")
    a("--lr-step", type=int, help=f"multiply the rate by 0.1 every this many epochs (paper: {PAPER['lr_step']}; demo: {PRESET['lr_step']})")
    a("--warmup", type=float, help="epochs of linear learning-rate warmup (paper: 0; demo: 2)")
    a("--cw", type=float, default=1e-4, help="C_W, weight of Ω(W) in eq. 1 (paper: 1e-4)")
    a("--ctheta", type=float, default=1e-4, help="C_Θ, weight of Σ Γ_l(Θ^l) in eq. 1 (paper: 1e-4)")
    a("--compressed-beta", type=float, default=0.1, help="β of Ψ for --model compressed (paper: 0.1)")
    a("--threshold", type=float, default=1e-5, help="after training, zero weights with |w| below this (paper: 1e-5)")
    a("--image-size", type=int, help="crop size; images are resized to size·256/224 first (paper: 224; demo: 32)")
    a("--width-mult", type=float, help="scale every dictionary size 128/256/512 (paper: 1; demo: 1/16)")
    a("--stem", choices=("auto", "imagenet", "small"),
      help="first layer's strides: imagenet = conv and pool stride 2 (224→56), small = 1; auto: small below 96 px")
    a("--reg-update", choices=("subgradient", "proximal"), default="subgradient",
      help="subgradient (paper) or proximal group soft-thresholding after each step (exact zeros)")
    a("--loss", choices=("cross_entropy", "hinge"), default="cross_entropy", help="data loss L of eq. 1")
    a("--device", choices=("auto", "cpu", "gpu"), default="auto", help="gpu uses CuPy; auto picks the GPU when present")
    a("--workers", type=int, help="image-decoding processes (default: CPU cores - 1, at most 8)")
    a("--cache", action="store_true", help="decode and resize the dataset once into a uint8 memory-mapped cache")
    a("--seed", type=int, default=0, help="seed of the initial weights, data order and crops")
    a("--out", metavar="DIR", help="output folder for log.jsonl, checkpoints, report.json and figures "
      "(default: runs/<model>-d<depth>-rho<rho>)")
    a("--resume", metavar="CKPT", help="continue training from a checkpoint (e.g. OUT/last.npz)")
    a("--evaluate", metavar="CKPT", help="only evaluate a checkpoint on the val split, then report")
    a("--no-progress", action="store_true", help="no progress bars (one line per epoch only)")
    return p


def fail(parser, message):
    """One clear line and exit status 2, before any work starts."""
    parser.exit(2, f"run.py: error: {message}\n")


def resolve_settings(args, parser):
    """Fill unset flags from the paper's settings (with --data) or the demo preset (without)."""
    s = vars(args).copy()
    # Flags the user set to something other than their default (None for preset-dependent ones).
    given = {k for k, v in s.items() if v is not None and v != parser.get_default(k)}
    if args.resume or args.evaluate:
        from minicompact.checkpoint import CheckpointError, load_checkpoint
        path = args.resume or args.evaluate
        try:
            _, _, state = load_checkpoint(path)
        except CheckpointError as exc:
            fail(parser, str(exc))
        saved = state.get("settings") or {}
        if not saved:
            fail(parser, f"{path} holds no run settings (was it written by run.py?)")
        for k in MATH_KEYS:
            if k in saved:
                if k in given and s[k] != saved[k]:
                    print(f"run.py: note: --{k.replace('_', '-')} {s[k]} ignored; the checkpoint's "
                          f"value {saved[k]} is used", file=sys.stderr)
                s[k] = saved[k]
        if s.get("epochs") is None:
            s["epochs"] = saved.get("epochs")
        if s.get("data") is None:  # the run's own data unless --data says where it is now
            s["data"] = saved.get("data")
        s["_state"] = state
    defaults = PAPER if s.get("data") else PRESET
    for k, v in defaults.items():
        if s.get(k) is None:
            s[k] = v
    if s["workers"] is None:
        s["workers"] = max(0, min(8, (os.cpu_count() or 1) - 1))
    if s["stem"] == "auto":
        s["stem"] = "small" if s["image_size"] < 96 else "imagenet"
    return s


def validate(s, parser):
    """Reject bad values with one line each, before any data is touched."""
    from minicompact.model import STEMS, dictionary_sizes
    checks = [
        (s["depth"] >= 2, f"--depth must be >= 2 (an L-layer net has L-1 feature layers), got {s['depth']}"),
        (s["depth"] <= 30, f"--depth must be <= 30, got {s['depth']}"),
        (0.0 <= s["rho"] <= 1.0, f"--rho must be in [0, 1], got {s['rho']}"),
        (s["epochs"] >= 1, f"--epochs must be >= 1, got {s['epochs']}"),
        (s["batch_size"] >= 1, f"--batch-size must be >= 1, got {s['batch_size']}"),
        (s["lr"] > 0, f"--lr must be > 0, got {s['lr']}"),
        (0.0 <= s["momentum"] < 1.0, f"--momentum must be in [0, 1), got {s['momentum']}"),
        (s["lr_step"] >= 1, f"--lr-step must be >= 1, got {s['lr_step']}"),
        (s["warmup"] >= 0, f"--warmup must be >= 0, got {s['warmup']}"),
        (s["cw"] >= 0 and s["ctheta"] >= 0, f"--cw and --ctheta must be >= 0, got {s['cw']} and {s['ctheta']}"),
        (0.0 <= s["compressed_beta"] <= 1.0, f"--compressed-beta must be in [0, 1], got {s['compressed_beta']}"),
        (s["threshold"] >= 0, f"--threshold must be >= 0, got {s['threshold']}"),
        (s["width_mult"] > 0, f"--width-mult must be > 0, got {s['width_mult']}"),
        (s["workers"] >= 0, f"--workers must be >= 0, got {s['workers']}"),
    ]
    for ok, message in checks:
        if not ok:
            fail(parser, message)
    # The feature maps reaching the pyramid must be at least 4×4 (the finest level).
    conv_stride, pool_stride = STEMS[s["stem"]]
    size = s["image_size"]
    if size < 8:
        fail(parser, f"--image-size must be >= 8, got {size}")
    side = -(-size // conv_stride)
    side = -(-side // pool_stride)
    sizes = dictionary_sizes(s["depth"], width_mult=s["width_mult"])
    for prev, k in zip(sizes, sizes[1:]):
        if k > prev:
            side = -(-side // 2)
    if side < 4:
        fail(parser, f"--image-size {size} leaves {side}x{side} feature maps before the spatial pyramid "
                     f"(needs >= 4x4); use a larger --image-size or --stem small")
    if s.get("data") and not os.path.isdir(s["data"]):
        fail(parser, f"--data {s['data']!r} is not a folder")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.evaluate:
        fail(parser, "use either --resume or --evaluate, not both")
    s = resolve_settings(args, parser)
    validate(s, parser)

    # Everything below may be slow; every cheap check has passed.
    from minicompact import backend
    from minicompact.checkpoint import CheckpointError
    from minicompact.data.folders import DatasetError, open_dataset
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            device = backend.resolve_device(s["device"])
    except backend.BackendError as exc:
        fail(parser, str(exc))
    for w in caught:  # "auto" fell back to the CPU: say so once, in one line
        print(f"run.py: note: {w.message}", file=sys.stderr)
    if s["data"] is None:
        from minicompact.data.synthetic import ensure_synthetic_dataset
        print("run.py: no --data given: using the generated demo dataset (see README)")
        s["data"] = str(ensure_synthetic_dataset())
    try:
        train_set, val_set = open_dataset(s["data"])
    except DatasetError as exc:
        fail(parser, str(exc))
    out = s["out"] or (os.path.dirname(os.path.abspath(s["resume"] or s["evaluate"]))
                       if (s["resume"] or s["evaluate"])
                       else os.path.join("runs", f"{s['model']}-d{s['depth']}-rho{s['rho']:g}"))
    s["out"] = out
    try:
        return run(s, device, train_set, val_set)
    except CheckpointError as exc:
        fail(parser, str(exc))


def run(s, device, train_set, val_set):
    """Build everything from the resolved settings ``s`` and train and/or evaluate."""
    from minicompact.data.loader import BatchLoader
    from minicompact.data.transforms import estimate_mean_std, scaled_sizes
    from minicompact.losses import multiclass_hinge_loss, softmax_cross_entropy
    from minicompact.model import CompactNet, ModelConfig
    from minicompact.objective import Regularizer
    from minicompact.optim import SGD, StepLR
    from minicompact.regularizers import variant
    from minicompact.report import format_report, write_report
    from minicompact.training import Interrupted, NonFiniteLoss, Trainer

    os.makedirs(s["out"], exist_ok=True)
    resize, crop = scaled_sizes(s["image_size"])
    state = s.pop("_state", None)
    config = ModelConfig(depth=s["depth"], num_classes=len(train_set.classes), width_mult=s["width_mult"],
                         stem=s["stem"], classes=list(train_set.classes))
    model = CompactNet(config, seed=s["seed"]).to(device)
    reg_config = variant(s["model"], s["depth"], s["rho"], compressed_beta=s["compressed_beta"])
    optimizer = SGD(model.param_layers, lr=s["lr"], momentum=s["momentum"])
    regularizer = Regularizer(model, reg_config, s["cw"], s["ctheta"], s["reg_update"])
    schedule = StepLR(s["lr"], step_size=s["lr_step"], gamma=0.1, warmup_epochs=s["warmup"])
    cache_dir = os.path.join(s["out"], "cache") if s["cache"] else None  # one .npy per split
    common = dict(resize=resize, crop=crop, workers=s["workers"], seed=s["seed"])
    train_loader = BatchLoader(train_set, s["batch_size"], mode="train", drop_last=False,
                               cache=cache_dir, **common)
    val_loader = BatchLoader(val_set, s["batch_size"], mode="center", cache=cache_dir, **common)
    ten_loader = BatchLoader(val_set, max(1, s["batch_size"] // 10), mode="tencrop",
                             cache=cache_dir, **common)
    if state and "mean" in state:
        mean, std = state["mean"], state["std"]
    else:
        mean, std = estimate_mean_std(train_set, resize, seed=s["seed"], cache=train_loader.cache)
    loss_fn = softmax_cross_entropy if s["loss"] == "cross_entropy" else multiclass_hinge_loss
    settings = {k: v for k, v in s.items() if not k.startswith("_") and k not in ("resume", "evaluate")}
    trainer = Trainer(model, optimizer, schedule, regularizer, loss_fn, train_loader, val_loader, mean, std,
                      epochs=s["epochs"], out_dir=s["out"], settings=settings,
                      progress=not s["no_progress"])
    print(f"run.py: {s['model']}net depth {s['depth']} rho {s['rho']:g} on {device}; "
          f"{len(train_set)} train / {len(val_set)} val images, {len(train_set.classes)} classes; "
          f"{resize}px resized, {crop}px crops; {model.parameter_count():,} parameters; out: {s['out']}")
    if s["resume"] or s["evaluate"]:
        from minicompact.checkpoint import CheckpointError, load_checkpoint
        path = s["resume"] or s["evaluate"]
        saved = ModelConfig.from_json(str(load_checkpoint(path)[0]["__config__"]))
        if saved != config:
            raise CheckpointError(f"{path} holds a model for {len(saved.classes)} classes "
                                  f"({', '.join(saved.classes[:3])}, ...) at depth {saved.depth}; it does not "
                                  f"match this data ({len(config.classes)} classes) and settings")
        trainer.resume(path)
    try:
        with train_loader, val_loader, ten_loader:
            if not s["evaluate"]:
                t0 = time.time()
                trainer.fit()
                print(f"run.py: trained {s['epochs']} epochs in {time.time() - t0:.0f} s")
            report = write_report(trainer, ten_loader, s["out"], s["threshold"],
                                  {k: s[k] for k in ("model", "depth", "rho")})
    except Interrupted as exc:
        print(f"\nrun.py: {exc}; checkpoint written: {os.path.join(s['out'], 'last.npz')} "
              f"(continue with --resume)")
        return 130
    except NonFiniteLoss as exc:
        print(f"\nrun.py: stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside training
        print("\nrun.py: aborted; the last checkpoint written is kept", file=sys.stderr)
        return 130
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
