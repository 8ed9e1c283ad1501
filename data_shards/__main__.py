"""Command line: write one split as shards, or verify a shard directory.

    python -m data_shards SOURCE --input PATH --out DIR --name NAME --split SPLIT [--shard-size N]
                                 [--resolution R] [--limit N] [--workers N] [--overwrite] ...
    python -m data_shards verify DIR [--name NAME] [--split SPLIT] [--decode]

SOURCE is one of folder, cifar10, lsun, celeba, mnist, fashion_mnist, stackedmnist. Examples (method.md §8, §10):

    python -m data_shards cifar10 --input cifar-10-batches-py --out shards/cifar10 --split train
    python -m data_shards celeba --input img_align_celeba --partition list_eval_partition.txt --out shards/celeba64 \\
        --name celeba64 --split train --workers 8
    python -m data_shards lsun --input church_outdoor_train_lmdb --out shards/lsun --name church --limit 120000
    python -m data_shards mnist --input mnist --out shards/mnist --split test
    python -m data_shards fashion_mnist --input fashion-mnist --out shards/fashion --name fashion --resolution 32
    python -m data_shards stackedmnist --input mnist --out shards/stackedmnist --split train
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_shards import sources
from data_shards.verify import verify_dir
from data_shards.writer import records, write_split

SOURCES = ("folder", "cifar10", "lsun", "celeba", "mnist", "fashion_mnist", "stackedmnist")


def write_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_shards", description="Write one split as WebDataset shards "
                                "with DALI index files and a manifest (verify: python -m data_shards verify DIR).")
    p.add_argument("source", choices=SOURCES)
    p.add_argument("--input", type=Path, required=True, help="the raw dataset (folder, pickles dir, LMDB, IDX dir)")
    p.add_argument("--out", type=Path, required=True, help="shard directory")
    p.add_argument("--name", help="dataset name in file names (default: the source)")
    p.add_argument("--split", default="train", help="split name; selects the source's split where it has them")
    p.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    p.add_argument("--resolution", type=int, default=None,
                   help="celeba: output size (default 64); stackedmnist: padded size (default 32); mnist, "
                        "fashion_mnist: padded size (default: 28, unpadded); folder/lsun: "
                        "resize shorter side + centre crop to PNG (default: keep the source's bytes)")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples (LSUN church: 120000)")
    p.add_argument("--jpeg-quality", type=int, default=None, metavar="Q",
                   help="folder/lsun: store images as JPEG at quality Q (1-100, 4:4:4), which DALI decodes on the GPU "
                        "(LSUN's WebP and PNG decode on the CPU); JPEG sources without --resolution stay as they are")
    p.add_argument("--workers", type=int, default=1, help="encoding processes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing complete split")
    p.add_argument("--class-dirs", action="store_true", help="folder: label = first-level subdirectory")
    p.add_argument("--partition", type=Path, default=None, help="celeba: list_eval_partition.txt to select --split")
    p.add_argument("--num-samples", type=int, default=None, help="stackedmnist: samples to draw (default: MNIST's)")
    p.add_argument("--seed", type=int, default=0, help="stackedmnist: seed of the digit draw")
    return p


def make_source(a: argparse.Namespace) -> sources.Source:
    if not a.input.exists():
        raise FileNotFoundError(f"--input {a.input} does not exist")
    if a.jpeg_quality is not None and (a.source not in ("folder", "lsun") or not 1 <= a.jpeg_quality <= 100):
        raise ValueError(f"--jpeg-quality {a.jpeg_quality}: a quality 1-100, for the folder and lsun sources")
    if a.source == "folder":
        return sources.folder(a.input, a.split, a.resolution, a.class_dirs, a.limit, a.jpeg_quality)
    if a.source == "cifar10":
        return sources.cifar10(a.input, a.split, a.limit)
    if a.source == "lsun":
        return sources.lsun(a.input, a.split, a.resolution, a.limit, a.jpeg_quality)
    if a.source == "celeba":
        return sources.celeba(a.input, a.split, a.resolution or 64, a.partition, a.limit)
    if a.source == "mnist":
        return sources.mnist(a.input, a.split, a.limit, a.resolution)
    if a.source == "fashion_mnist":
        return sources.fashion_mnist(a.input, a.split, a.limit, a.resolution)
    return sources.stackedmnist(a.input, a.split, a.num_samples, a.seed, a.resolution or 32, a.limit)


def write_main(argv: list[str]) -> int:
    a = write_parser().parse_args(argv)
    src = make_source(a)
    name = a.name or a.source
    m = write_split(records(src.jobs, src.make, a.workers), a.out, name, a.split, src.meta, src.labels,
                    a.shard_size, a.overwrite)
    img = m["image"]
    print(f"{name}-{a.split}: {m['num_samples']} samples in {m['num_shards']} shards ({m['pattern']}), "
          f"{'x'.join(map(str, (img['height'], img['width']))) if img['height'] else 'mixed sizes'} "
          f"{'/'.join(img['exts'])}, {img['channels']} channel(s), labels: "
          f"{(m['labels'] or {}).get('kind', 'none')} -> {a.out}")
    return 0


def verify_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m data_shards verify", description="Check manifests, shard sizes, "
                                "sample counts and sha256 (and with --decode every image and label).")
    p.add_argument("dir", type=Path)
    p.add_argument("--name")
    p.add_argument("--split")
    p.add_argument("--decode", action="store_true", help="also decode every image (slow on big sets)")
    a = p.parse_args(argv)
    problems = verify_dir(a.dir, a.name, a.split, a.decode)
    for line in problems:
        print(f"PROBLEM {line}")
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["verify"]:
        return verify_main(argv[1:])
    try:
        return write_main(argv)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
