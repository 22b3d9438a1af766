#!/usr/bin/env python3
"""A small-scale Table 2 (paper sec. 5.3.3): transfer between two halves of CIFAR-10.

    nice -n 10 python bench/transfer_table.py --archive PATH/cifar10-train.tar.gz --work /tmp/t2

Pre-trains a CompactNet and a SimpleNet on five CIFAR-10 classes (the *source*), then, on the
other five (the *target*, 15-Scenes-style: 100 training images per class, the test images
drawn from the rest), over five random splits: training from scratch, the source's pyramid
features + a linear SVM (and soft-max), and fine-tuning.  Every row is a ``run.py`` command
(printed as it runs); results go to WORK/results.json (kept between calls: a row already
measured is not run again) and the table is printed as mean ± std of the top-1 error (%).

The archive is the CIFAR-10 training set as ImageNet-style class folders of JPEGs
(train/<class>/*.jpg); any such archive or folder of natural images works.
"""
import argparse
import json
import os
import sys
import tarfile

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
import run  # noqa: E402

SOURCE = ("airplane", "automobile", "bird", "cat", "deer")
TARGET = ("dog", "frog", "horse", "ship", "truck")


def unpack(archive, dest, per_class):
    """dest/<class>/*.jpg: the first ``per_class`` images of every class of the archive."""
    if os.path.isdir(dest):
        return dest
    counts = {}
    with tarfile.open(archive) as tar:
        for m in tar:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) < 3 or not parts[-1].lower().endswith(".jpg"):
                continue
            cls = parts[-2]
            if counts.get(cls, 0) >= per_class:
                continue
            os.makedirs(os.path.join(dest + ".tmp", cls), exist_ok=True)
            with open(os.path.join(dest + ".tmp", cls, parts[-1]), "wb") as f:
                f.write(tar.extractfile(m).read())
            counts[cls] = counts.get(cls, 0) + 1
    os.rename(dest + ".tmp", dest)
    return dest


def make_split(pool, root, classes, train, test, seed):
    """root/{train,val}/<class>/: ``train`` and ``test`` random images per class (links)."""
    if os.path.isdir(root):
        return root
    rng = np.random.default_rng(seed)
    for c in classes:
        files = sorted(os.listdir(os.path.join(pool, c)))
        pick = rng.permutation(len(files))
        for split, idx in (("train", pick[:train]), ("val", pick[train:train + test])):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in idx:
                os.symlink(os.path.abspath(os.path.join(pool, c, files[i])),
                           os.path.join(root, split, c, files[i]))
    return root


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archive", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--splits", type=int, default=5)
    p.add_argument("--source-train", type=int, default=600, help="source training images per class")
    p.add_argument("--target-train", type=int, default=100)
    p.add_argument("--target-test", type=int, default=60)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width-mult", type=float, default=0.0625)
    p.add_argument("--pre-epochs", type=int, default=5)
    p.add_argument("--scratch-epochs", type=int, default=8)
    p.add_argument("--finetune-epochs", type=int, default=4)
    a = p.parse_args()
    work = os.path.abspath(a.work)
    os.makedirs(work, exist_ok=True)
    pool = unpack(a.archive, os.path.join(work, "pool"), a.source_train + 200)
    results_path = os.path.join(work, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    common = ["--depth", a.depth, "--width-mult", a.width_mult, "--image-size", 32, "--batch-size", 32,
              "--workers", 0, "--no-progress", "--momentum", 0.9]

    def once(key, args, read):
        if key in results:
            return results[key]
        args = [str(x) for x in args]
        print("$ python run.py " + " ".join(args), flush=True)
        if run.main(args) != 0:
            raise SystemExit(f"{key} failed")
        results[key] = read()
        with open(results_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(results_path + ".tmp", results_path)
        return results[key]

    def top1(out):
        with open(os.path.join(out, "report.json")) as f:
            acc = json.load(f)["after_threshold"]["accuracy"]
        return {"single": acc["single_crop"]["top1_error"], "ten": acc["ten_crop"]["top1_error"]}

    def features_top1(out):
        with open(os.path.join(out, "features.json")) as f:
            c = json.load(f)["classifiers"]
        return {f"{loss}_{k}": c[loss][f"{k}_crop"]["top1_error"] for loss in c for k in ("single", "ten")}

    source = make_split(pool, os.path.join(work, "source"), SOURCE, a.source_train, 40, seed=1000)
    pre = {}
    for model in ("compact", "simple"):
        out = os.path.join(work, f"pre-{model}")
        once(f"pre-{model}", ["--data", source, "--model", model, "--epochs", a.pre_epochs, "--lr", 0.01,
                              "--warmup", 1, "--lr-step", a.pre_epochs - 1, "--out", out, "--overwrite", *common],
             lambda out=out: top1(out))
        pre[model] = os.path.join(out, "model.npz")
    for split in range(a.splits):
        data = make_split(pool, os.path.join(work, f"target-{split}"), TARGET, a.target_train,
                          a.target_test, seed=split)
        for model in ("compact", "simple"):
            out = os.path.join(work, f"s{split}-scratch-{model}")
            once(f"s{split}-scratch-{model}", ["--data", data, "--model", model, "--epochs", a.scratch_epochs,
                                                "--lr", 0.01, "--warmup", 2, "--lr-step", a.scratch_epochs - 2,
                                                "--seed", split, "--out", out, "--overwrite", *common],
                 lambda out=out: top1(out))
            out = os.path.join(work, f"s{split}-features-{model}")
            once(f"s{split}-features-{model}", ["--features", pre[model], "--data", data, "--workers", 0,
                                                 "--batch-size", 64, "--seed", split, "--out", out, "--overwrite"],
                 lambda out=out: features_top1(out))
            out = os.path.join(work, f"s{split}-finetune-{model}")
            once(f"s{split}-finetune-{model}", ["--finetune", pre[model], "--data", data,
                                                 "--epochs", a.finetune_epochs, "--lr", 0.002, "--warmup", 1,
                                                 "--lr-step", a.finetune_epochs - 1, "--seed", split,
                                                 "--out", out, "--overwrite", *common],
                 lambda out=out: top1(out))
        print_table(results, a.splits)


def sd(values):
    """Sample standard deviation (0 for one value)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def print_table(results, splits):
    """Mean ± std over the splits measured so far of each row's top-1 error (%)."""
    rows = [("CompactNet from scratch", "scratch-compact", "single"),
            ("SimpleNet from scratch", "scratch-simple", "single"),
            ("CompactNet features + SVM", "features-compact", "svm_single"),
            ("SimpleNet features + SVM", "features-simple", "svm_single"),
            ("CompactNet features + soft-max", "features-compact", "softmax_single"),
            ("SimpleNet features + soft-max", "features-simple", "softmax_single"),
            ("CompactNet fine-tuning", "finetune-compact", "single"),
            ("SimpleNet fine-tuning", "finetune-simple", "single")]
    print("\n| method | top-1 error, 1 crop (%) | top-1 error, 10 crops (%) | splits |\n|---|---|---|---|")
    for name, key, field in rows:
        one = [results[f"s{s}-{key}"][field] for s in range(splits) if f"s{s}-{key}" in results]
        ten = [results[f"s{s}-{key}"][field.replace("single", "ten")] for s in range(splits)
               if f"s{s}-{key}" in results]
        if one:
            print(f"| {name} | {np.mean(one):.1f} ± {sd(one):.1f} | {np.mean(ten):.1f} ± {sd(ten):.1f} "
                  f"| {len(one)} |")
    for model in ("compact", "simple"):
        if f"pre-{model}" in results:
            print(f"source ({model}net pre-training, 5 classes): top-1 error {results[f'pre-{model}']['single']:.1f}%")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
