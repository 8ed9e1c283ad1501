"""Readers of the raw datasets: each returns the jobs to encode, the (picklable) function that turns a job into a
Record, label info and a description of the source for the manifest.

Encodings: CIFAR, MNIST and StackedMNIST are written as lossless PNG; folder and LSUN images keep their own
encoding (bytes copied) unless --resolution asks for a resize; CelebA64 is cropped to the box (15, 40, 163, 188)
and resized to 64 (method.md §8), then stored as PNG so the crop is not compressed twice.
"""

from __future__ import annotations

import gzip
import io
import pickle
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np

from data_shards.writer import Record, encode_jpeg, encode_png
from ddaebm.data.shards import sniff_ext

CELEBA64_BOX = (15, 40, 163, 188)  # NVAE/DDGAN CropCelebA64: (left, upper, right, lower)
SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
SPLIT_FILES = {"cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
               "mnist": {"train": "train", "test": "t10k"}}


class Source(NamedTuple):
    jobs: Iterable
    make: Callable
    labels: dict | None
    meta: dict


def _limited(jobs: Iterable, limit: int | None) -> Iterable:
    return jobs if limit is None else islice(jobs, limit)


def _known_split(kind: str, split: str):
    if split not in SPLIT_FILES[kind]:
        raise ValueError(f"{kind} has splits {sorted(SPLIT_FILES[kind])}, not {split!r}")
    return SPLIT_FILES[kind][split]


def resize_crop(im, r: int):
    """Shorter side to r (bilinear, antialiased), centre crop r×r: the loader's LSUN transform, done early."""
    from PIL import Image

    w, h = im.size
    size = (r, int(h * r / w + 0.5)) if w <= h else (int(w * r / h + 0.5), r)
    left, top = (size[0] - r + 1) // 2, (size[1] - r + 1) // 2
    return im.resize(size, Image.BILINEAR).crop((left, top, left + r, top + r))


def _from_bytes(job, resolution: int | None, jpeg_quality: int | None = None) -> Record:
    """Folder/LSUN: keep the source's encoding, or resize+crop when a resolution is given; stored as PNG, or as
    JPEG at `jpeg_quality` (a JPEG source without resize is kept as it is: re-encoding would only lose)."""
    data, label, src = job
    try:
        ext = sniff_ext(data)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None
    if resolution is None and (jpeg_quality is None or ext in ("jpg", "jpeg")):
        return Record(data, ext, label, src)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB")
        pixels = np.asarray(im if resolution is None else resize_crop(im, resolution))
    if jpeg_quality is not None:
        return Record(encode_jpeg(pixels, jpeg_quality), "jpg", label, src)
    return Record(encode_png(pixels), "png", label, src)


def _read_job(job, resolution: int | None, jpeg_quality: int | None = None) -> Record:
    path, label, src = job
    return _from_bytes((Path(path).read_bytes(), label, src), resolution, jpeg_quality)


def folder(input: Path, split: str, resolution: int | None = None, class_dirs: bool = False,
           limit: int | None = None, jpeg_quality: int | None = None) -> Source:
    """Every image under `input` (recursively, sorted by path). With class_dirs, the label is the index of the
    first-level subdirectory among the sorted subdirectory names (torchvision's ImageFolder convention)."""
    files = sorted(p for p in input.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no .png/.jpg/.jpeg/.webp images under {input}")
    classes = sorted({p.relative_to(input).parts[0] for p in files if len(p.relative_to(input).parts) > 1})
    if class_dirs and any(len(p.relative_to(input).parts) < 2 for p in files):
        raise ValueError(f"--class-dirs: images directly in {input} have no class directory")
    label = {c: i for i, c in enumerate(classes)}
    jobs = ((str(p), label[p.relative_to(input).parts[0]] if class_dirs else None, str(p.relative_to(input)))
            for p in files)
    labels = {"kind": "class", "num_classes": len(classes), "names": classes} if class_dirs else None
    return Source(_limited(jobs, limit), partial(_read_job, resolution=resolution, jpeg_quality=jpeg_quality), labels,
                  {"kind": "folder", "path": str(input), "resolution": resolution, "jpeg_quality": jpeg_quality})


def _cifar_job(job) -> Record:
    image, label = job
    return Record(encode_png(image), "png", int(label))


def cifar10(input: Path, split: str, limit: int | None = None) -> Source:
    """CIFAR-10's python pickles (`cifar-10-batches-py`): data_batch_1..5 = train, test_batch = test."""
    names = _known_split("cifar10", split)
    missing = [n for n in names if not (input / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{input}: missing {missing} (expected the cifar-10-batches-py directory)")

    def jobs():
        for n in names:
            with open(input / n, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            images = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            yield from zip(images, batch[b"labels"])

    meta = input / "batches.meta"
    names_ = None
    if meta.is_file():
        with open(meta, "rb") as f:
            names_ = [n.decode() for n in pickle.load(f, encoding="bytes")[b"label_names"]]
    return Source(_limited(jobs(), limit), _cifar_job, {"kind": "class", "num_classes": 10, "names": names_},
                  {"kind": "cifar10", "path": str(input), "files": names})


def open_lmdb(path: Path):
    import lmdb

    if not path.exists():
        raise FileNotFoundError(f"LMDB {path} does not exist")
    return lmdb.open(str(path), readonly=True, lock=False, readahead=False, max_readers=1, subdir=path.is_dir())


def _lmdb_items(path: Path, numeric: bool) -> Iterable[tuple[bytes, bytes]]:
    """(key, value) in LMDB key order, or in numeric key order when every key is an integer (NVAE's
    str(idx) keys, whose byte order would put '10' before '2')."""
    env = open_lmdb(path)
    with env.begin() as txn:
        keys = list(txn.cursor().iternext(keys=True, values=False))
    if numeric and all(k.isdigit() for k in keys):
        keys.sort(key=int)
    with env.begin() as txn:
        for k in keys:
            yield k, txn.get(k)
    env.close()


def lsun(input: Path, split: str, resolution: int | None = None, limit: int | None = None,
         jpeg_quality: int | None = None) -> Source:
    """An LSUN LMDB (`<category>_<split>_lmdb`; keys -> encoded webp/jpeg, as LSUN's `export` tool reads it), in
    key order; `--limit 120000` gives DDGAN/DDAEBM's first 120k church images (method.md §8)."""
    jobs = ((v, None, k.decode()) for k, v in _lmdb_items(input, numeric=False))
    return Source(_limited(jobs, limit), partial(_from_bytes, resolution=resolution, jpeg_quality=jpeg_quality), None,
                  {"kind": "lsun", "path": str(input), "order": "lmdb key", "resolution": resolution, "limit": limit,
                   "jpeg_quality": jpeg_quality})


def _celeba_job(job, resolution: int) -> Record:
    from PIL import Image

    data, src = job
    if isinstance(data, str):
        data = Path(data).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB").crop(CELEBA64_BOX).resize((resolution, resolution), Image.BILINEAR)
    return Record(encode_png(np.asarray(im)), "png", None, src)


def _celeba_partition(partition: Path, split: str) -> set[str]:
    """File names of one split from CelebA's list_eval_partition.txt (0 train, 1 valid, 2 test)."""
    code = {"train": "0", "valid": "1", "val": "1", "test": "2"}.get(split)
    if code is None:
        raise ValueError(f"CelebA splits are train/valid/test, not {split!r}")
    return {ln.split()[0] for ln in partition.read_text().splitlines() if ln.split()[1:2] == [code]}


def celeba(input: Path, split: str, resolution: int = 64, partition: Path | None = None,
           limit: int | None = None) -> Source:
    """CelebA aligned images (a folder such as img_align_celeba of 178×218 JPEGs, or an LMDB of their encoded
    bytes), cropped to CELEBA64_BOX and resized to `resolution` (CelebA64: 64)."""
    if (input / "data.mdb").is_file() or input.suffix == ".lmdb" or input.is_file():
        jobs = ((v, k.decode()) for k, v in _lmdb_items(input, numeric=True))
    else:
        files = sorted(p for p in input.iterdir() if p.suffix.lower() in SUFFIXES)
        if partition is not None:
            keep = _celeba_partition(partition, split)
            files = [p for p in files if p.name in keep]
        if not files:
            raise FileNotFoundError(f"no CelebA images in {input}" + (f" for split {split}" if partition else ""))
        jobs = ((str(p), p.name) for p in files)
    return Source(_limited(jobs, limit), partial(_celeba_job, resolution=resolution), None,
                  {"kind": "celeba", "path": str(input), "crop_box": CELEBA64_BOX, "resize": resolution,
                   "partition": str(partition) if partition else None})


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (MNIST's format, gzip or not): magic 0 0 <dtype 0x08=uint8> <ndim>, big-endian dims, data."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file (magic {raw[:4]!r})")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">i4", ndim, 4).tolist()
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} values for shape {dims}")
    return data.reshape(dims)


def _find_idx(input: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (input / name).is_file():
            return input / name
    raise FileNotFoundError(f"{input}: no {stem}[.gz]")


def load_mnist(input: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = _known_split("mnist", split)
    images = read_idx(_find_idx(input, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(input, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"{input}: {images.shape} images for {labels.shape} labels")
    return images, labels.astype(np.int64)  # int64: StackedMNIST's 100a+10b+c overflows uint8


FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]


def _gray_job(job, pad: int = 0) -> Record:
    image, label = job
    return Record(encode_png(np.pad(image, pad) if pad else image), "png", int(label))


def _pad_for(resolution: int | None, kind: str) -> int:
    """Zero border that takes 28×28 images to resolution² (None: keep 28)."""
    if resolution is None:
        return 0
    if resolution < 28 or (resolution - 28) % 2:
        raise ValueError(f"{kind} pads 28x28 images symmetrically: --resolution {resolution} must be 28+2k")
    return (resolution - 28) // 2


def mnist(input: Path, split: str, limit: int | None = None, resolution: int | None = None,
          kind: str = "mnist") -> Source:
    """MNIST IDX files (train-*/t10k-*, gz or not): 28×28 grayscale PNGs, label 0-9; zero-padded to
    `resolution`² when given (32: the MNIST OOD set of a 32² model, as StackedMNIST pads).
    kind='fashion_mnist' reads Fashion-MNIST, whose files have the same names and format."""
    images, labels = load_mnist(input, split)
    pad = _pad_for(resolution, kind)
    names = FASHION_NAMES if kind == "fashion_mnist" else [str(d) for d in range(10)]
    return Source(_limited(zip(images, labels), limit), partial(_gray_job, pad=pad),
                  {"kind": "class", "num_classes": 10, "names": names},
                  {"kind": kind, "path": str(input), "split_files": SPLIT_FILES["mnist"][split],
                   **({"pad_to": resolution} if pad else {})})


def fashion_mnist(input: Path, split: str, limit: int | None = None, resolution: int | None = None) -> Source:
    """Fashion-MNIST (the IDX files train-*/t10k-*, 60k/10k 28×28 grayscale, 10 classes), padded as `mnist`."""
    return mnist(input, split, limit, resolution, kind="fashion_mnist")


def _stacked_job(job, pad: int) -> Record:
    image, label = job
    return Record(encode_png(np.pad(image, ((pad, pad), (pad, pad), (0, 0)))), "png", int(label))


def stackedmnist(input: Path, split: str, num_samples: int | None = None, seed: int = 0, resolution: int = 32,
                 limit: int | None = None) -> Source:
    """StackedMNIST (method.md §10): three MNIST digits drawn uniformly with replacement
    (`default_rng(seed).integers(0, N, (num_samples, 3))`) become the R, G, B channels; label 100a+10b+c
    (1000 modes); zero-padded from 28² to `resolution`² (DDGAN pads to 32)."""
    images, labels = load_mnist(input, split)
    if resolution < 28 or (resolution - 28) % 2:
        raise ValueError(f"StackedMNIST pads 28x28 digits symmetrically: --resolution {resolution} must be 28+2k")
    n = num_samples or len(images)
    ids = np.random.default_rng(seed).integers(0, len(images), size=(n, 3))
    jobs = ((np.stack([images[a], images[b], images[c]], axis=-1), 100 * labels[a] + 10 * labels[b] + labels[c])
            for a, b, c in ids)
    return Source(_limited(jobs, limit), partial(_stacked_job, pad=(resolution - 28) // 2),
                  {"kind": "stackedmnist", "num_classes": 1000, "rule": "100*R digit + 10*G digit + B digit"},
                  {"kind": "stackedmnist", "path": str(input), "mnist_split": split, "num_samples": n, "seed": seed,
                   "draw": "numpy default_rng(seed).integers(0, N, (num_samples, 3))", "pad_to": resolution})
