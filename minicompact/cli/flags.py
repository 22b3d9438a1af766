"""run.py's command line: every flag, its default and its help, in one parser.

``parse(argv)`` also says which flags the user typed: a second parser without defaults
(``given_only``) yields only those, so an explicit ``--rho 0.03`` can be told from the
default 0.03 (a resumed run keeps its checkpoint's value unless the flag is typed again).
"""
import argparse

from ..architectures import CHOICES
from .console import HelpFormatter, Parser
from .settings import PAPER, PRESET


def parse(argv):
    """(args, given): the parsed ``argparse.Namespace`` and the set of flag names typed in ``argv``."""
    args = build_parser().parse_args(argv)
    given = set(vars(build_parser(given_only=True).parse_args(argv)))
    return args, given


def build_parser(given_only=False):
    """The command line.  ``given_only``: no defaults at all, so parsing yields only the flags
    the user typed (see ``parse``)."""
    p = Parser(
        prog="run.py", description="Train and evaluate CompactNets (Lobel, Vidal & Soto 2019) on "
        "ImageNet-style folders ROOT/train/<class>/*, ROOT/val/<class>/*.",
        formatter_class=HelpFormatter, argument_default=argparse.SUPPRESS if given_only else None)

    def a(*flags, **kw):
        if given_only:
            kw.pop("default", None)
        p.add_argument(*flags, **kw)
    a("--data", metavar="ROOT", help="dataset root with train/ and val/ class folders; "
      "omitted: a generated demo dataset and a small preset (see README)")
    a("--arch", choices=CHOICES, default="compactnet",
      help="the network: compactnet (the paper's, --depth layers), or vgg11 / resnet18 trained with --model's "
           "regularizers (VGG11_CC, ResNet18_CC of sec. 5.3.4, Table 3), whose depth is their own: --depth is "
           "ignored (docs/architectures.md)")
    a("--depth", type=int, default=12, help="number of layers L (L-1 feature layers + classifier); paper's best: 12")
    a("--rho", type=float, default=0.03, help="regularization strength ρ = α = β_{L-1}; paper's best: 0.03")
    a("--model", choices=("compact", "compressed", "simple"), default="compact",
      help="CompactNet (Ω+Γ), CompressedNet (Ψ, β=0.1) or SimpleNet (ℓ2 only)")
    a("--epochs", type=int, help=f"training epochs (paper: {PAPER['epochs']}; demo: {PRESET['epochs']})")
    a("--batch-size", type=int, help=f"images per SGD step (paper: {PAPER['batch_size']}; demo: {PRESET['batch_size']})")
    a("--lr", type=float, help=f"initial learning rate (paper: {PAPER['lr']}; demo: {PRESET['lr']})")
    a("--momentum", type=float, help="SGD momentum (paper: 0.9)")
    a("--lr-step", type=int, help=f"multiply the rate by 0.1 every this many epochs (paper: {PAPER['lr_step']}; demo: {PRESET['lr_step']})")
    a("--warmup", type=float, help="epochs of linear learning-rate warmup, at most --epochs (paper: 0; demo: 2)")
    a("--cw", type=float, default=1e-4, help="C_W, weight of Ω(W) in eq. 1 (paper: 1e-4); given, it is used "
      "as written, without --group-scale's factor")
    a("--ctheta", type=float, default=1e-4, help="C_Θ, weight of Σ Γ_l(Θ^l) in eq. 1 (paper: 1e-4); as --cw")
    a("--group-scale", type=float, help="multiply the group-lasso parts of Ω, Γ, Ψ by this, keeping the ℓ2 "
      "parts' C (default: the paper's Σ lr over this run's, 1 on the paper's schedule; docs/compactness.md)")
    a("--compressed-beta", type=float, default=0.1, help="β of Ψ for --model compressed (paper: 0.1)")
    a("--threshold", type=float, default=1e-5, help="after training, zero weights with |w| below this (paper: 1e-5)")
    a("--image-size", type=int, help="crop size; images are resized to size·256/224 first (paper: 224; demo: 32)")
    a("--width-mult", type=float, help="scale every dictionary size 128/256/512 (paper: 1; demo: 1/16)")
    a("--stem", choices=("auto", "imagenet", "small"),
      help="first layer's strides: imagenet = conv and pool stride 2 (224→56), small = 1; auto: small below 96 px")
    a("--reg-update", choices=("auto", "subgradient", "proximal"), default="auto",
      help="subgradient (paper) or proximal group soft-thresholding after each step (exact zeros); "
      "auto: subgradient for the paper's schedule, proximal for shorter runs")
    a("--loss", choices=("cross_entropy", "hinge"), default="cross_entropy", help="data loss L of eq. 1")
    a("--device", choices=("auto", "cpu", "gpu"), default="auto", help="gpu uses CuPy; auto picks the GPU when present")
    a("--precision", choices=("fp32", "tf32"), default="fp32",
      help="float32 matrix products on the GPU: fp32, or tf32 (TF32 tensor cores, as PyTorch's default "
           "convolutions; no effect on the CPU)")
    a("--conv-algo", choices=("auto", "im2col", "winograd"), default="im2col",
      help="3x3 stride-1 convolutions by im2col + GEMM, Winograd F(2x2, 3x3), or auto: the faster, "
           "measured once per layer shape (same maths; see docs/winograd.md)")
    a("--cuda-graph", choices=("auto", "on", "off"), default="auto",
      help="capture the training step once as a CUDA graph and replay it for every full batch (one launch "
           "instead of hundreds; the same maths, checked against an eager step first, which a failure "
           "falls back to with a warning): auto = on a GPU with one process; on = the same, refused "
           "elsewhere (docs/gpu.md)")
    a("--workers", type=int, help="image-decoding processes (default: CPU cores - 1, at most 8)")
    a("--cache", action="store_true", help="decode and resize the dataset once into a uint8 memory-mapped "
      "cache in OUT/cache (refreshed when files change)")
    a("--cache-dir", metavar="DIR", help="--cache, kept in DIR/<data key>/ instead of OUT/cache: "
      "shared by every run on the same data (a sweep's points)")
    a("--check", action="store_true", help="only check the flags (as before any training) and exit: "
      "status 0 and no output when run.py would accept them")
    a("--seed", type=int, default=0, help="seed of the initial weights, data order and crops")
    a("--sync-bn", action="store_true", help="with several ranks (mpiexec -n N): batch-norm statistics "
      "over the global batch, not each rank's own")
    a("--out", metavar="DIR", help="output folder for log.jsonl, checkpoints, report.json and figures "
      "(default: runs/<model>-d<depth>-rho<rho>, runs/<arch>-<model>-rho<rho> for vgg11/resnet18, or -2, -3, ... "
      "when that exists)")
    a("--overwrite", action="store_true", help="allow --out to replace the files of an earlier run there")
    a("--resume", metavar="CKPT", help="continue training from a checkpoint (e.g. OUT/last.npz), in its folder")
    a("--evaluate", metavar="CKPT", help="only evaluate a checkpoint (or a run's model.npz) on the val split; "
      "writes to CKPT's folder/eval-<name> unless --out is given")
    a("--thin", metavar="CKPT", help="remove the dead structure of a run's model.npz, best.npz or last.npz "
      "(minicompact/thin.py): writes thin.npz and thin-report.json into CKPT's folder/thin")
    a("--export", metavar="CKPT", help="write the network of CKPT (a run's model.npz, or a thin.npz) as an ONNX "
      "model, checked with ONNX Runtime on the val images: <name>.onnx and <name>-onnx.json in CKPT's folder "
      "(or --out DIR); needs pip install \"minicompact[onnx]\" (docs/export.md)")
    a("--finetune", metavar="CKPT", help="fine-tune the feature layers of CKPT (a run's model/best/last.npz) "
      "with a new classifier for --data's classes (docs/transfer.md)")
    a("--head-lr-mult", type=float, default=10.0, help="with --finetune: the new classifier's rate is this times --lr")
    a("--keep-reg", action="store_true", help="with --finetune: keep the regularizers (default: dropped, as the paper)")
    a("--freeze", type=int, default=0, help="with --finetune: freeze the first N feature layers (and their BN statistics)")
    a("--new-stats", action="store_true", help="with --finetune/--features: estimate the normalisation on --data "
      "instead of using CKPT's")
    a("--features", metavar="CKPT", help="extract CKPT's pyramid features of --data and train linear classifiers "
      "(SVM, soft-max) on them; writes features.json (docs/transfer.md)")
    a("--no-progress", action="store_true", help="no progress bars (they are drawn only on a terminal anyway)")
    return p
