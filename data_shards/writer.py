"""Writing one split as shards + DALI index files + manifest (format: ddaebm/data/shards.py)."""

from __future__ import annotations

import io
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

from ddaebm.data.shards import FORMAT, ShardWriter, manifest_path, shard_name, shard_pattern, write_manifest


class Record(NamedTuple):
    """One encoded sample: the image bytes as stored, their extension, the label (None: unlabelled) and where
    it came from (a file name or LMDB key, kept as `<key>.src` for provenance)."""

    image: bytes
    ext: str
    label: int | None = None
    src: str | None = None


def encode_jpeg(array, quality: int) -> bytes:
    """A JPEG at `quality` without chroma subsampling (4:4:4), of an H×W or H×W×3 uint8 array: the format that
    DALI's `mixed` decoder decodes on the GPU (nvJPEG), where PNG and WebP fall back to the CPU."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def encode_png(array) -> bytes:
    """Lossless PNG of an H×W (grayscale) or H×W×3 uint8 array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def image_header(data: bytes) -> tuple[int, int, str]:
    """(width, height, PIL mode) from the header: checks the source really gave an image, without decoding."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size[0], im.size[1], im.mode


def records(jobs: Iterable, make: Callable, workers: int) -> Iterable[Record]:
    """`make(job)` for every job, in order; in `workers` processes when encoding is the slow part."""
    if workers <= 1:
        yield from map(make, jobs)
        return
    with Pool(workers) as pool:
        yield from pool.imap(make, jobs, chunksize=32)


def clear_split(out: Path, name: str, split: str, overwrite: bool) -> None:
    """Refuse to overwrite a complete split unless asked; remove its old files (manifest first, so a killed
    rewrite never leaves an old manifest beside new shards) and any partial files of a killed writer."""
    manifest = manifest_path(out, name, split)
    if manifest.exists() and not overwrite:
        raise FileExistsError(f"{manifest} exists: {name}-{split} is already written (pass --overwrite to replace)")
    manifest.unlink(missing_ok=True)
    for pattern in (f"{name}-{split}-*.tar", f"{name}-{split}-*.idx", f".{name}-{split}-*.partial"):
        for p in out.glob(pattern):
            p.unlink()


def write_split(recs: Iterable[Record], out, name: str, split: str, source: dict, labels: dict | None,
                shard_size: int = 5000, overwrite: bool = False) -> dict:
    """Write all records as `<name>-<split>-NNNNNN.tar` shards of `shard_size` samples with keys `00000000`...,
    then the manifest. Returns the manifest."""
    if shard_size < 1:
        raise ValueError(f"--shard-size {shard_size}: needs at least 1 sample per shard")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clear_split(out, name, split, overwrite)
    shards, sizes, modes, exts, labelled, writer = [], set(), set(), set(), 0, None
    try:
        for i, rec in enumerate(recs):
            if writer is None:
                writer = ShardWriter(out / shard_name(name, split, len(shards)))
            w, h, mode = image_header(rec.image)
            sizes.add((h, w))
            modes.add(mode)
            exts.add(rec.ext)
            members = {rec.ext: rec.image}
            if rec.label is not None:
                members["cls"] = str(int(rec.label)).encode()
                labelled += 1
            if rec.src is not None:
                members["src"] = rec.src.encode()
            writer.add(f"{i:08d}", members)
            if len(writer.keys) == shard_size:
                shards.append(writer.close())
                writer = None
        if writer is not None:
            shards.append(writer.close())
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    if not shards:
        raise ValueError(f"no samples for {name}-{split} (source {source})")
    (height, width) = next(iter(sizes)) if len(sizes) == 1 else (None, None)
    manifest = {
        "format": FORMAT, "name": name, "split": split,
        "num_samples": sum(s["num_samples"] for s in shards), "num_shards": len(shards),
        "pattern": shard_pattern(name, split, len(shards)),
        "image": {"exts": sorted(exts), "height": height, "width": width, "modes": sorted(modes),
                  "channels": 1 if modes <= {"L", "1"} else 3,
                  "sizes": None if height else sorted(sizes)[:20]},
        "labels": None if not labelled else {**(labels or {}), "num_labelled": labelled},
        "source": source, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shards": shards,
    }
    write_manifest(out, manifest)
    return manifest
