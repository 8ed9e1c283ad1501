"""The on-disk shard format: WebDataset tars, DALI index files and a manifest that says when a set is complete.

A split `<name>-<split>` is a directory holding

- `<name>-<split>-000000.tar` ... : plain (USTAR) tars of samples `<key>.<img ext>` (+ `<key>.cls`, the label as
  ASCII text, + `<key>.src`, where the sample came from), any WebDataset reader reads them;
- `<name>-<split>-000000.idx` ... : DALI's webdataset index (the `v1.2` text format that DALI's `wds2idx` writes:
  a header `v1.2 <num samples>`, then one line per sample of `<ext> <data offset> <size> <member name>` groups),
  so `fn.readers.webdataset` starts without scanning and our own readers seek straight to a sample;
- `<name>-<split>.json` : the manifest (sample count and sha256 per shard, image size, source, label info).

Every file is written to a hidden temp name and renamed when complete; the manifest is written last, so a killed
writer leaves no set that looks complete (readers refuse a directory without its manifest).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from ddaebm.errors import BadValue, MissingFile
from ddaebm.fsio import write_atomic

FORMAT = "ddaebm-shards/1"
INDEX_VERSION = "v1.2"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def shard_name(name: str, split: str, i: int) -> str:
    return f"{name}-{split}-{i:06d}.tar"


def index_name(tar_name: str) -> str:
    """`x.tar` -> `x.idx`, the name DALI's `wds2idx` gives by default."""
    return tar_name[:-len(".tar")] + ".idx"


def manifest_path(root, name: str, split: str) -> Path:
    return Path(root) / f"{name}-{split}.json"


def shard_pattern(name: str, split: str, num_shards: int) -> str:
    """Brace notation for all shards of a split, as the `webdataset` library expands it."""
    return f"{name}-{split}-{{000000..{num_shards - 1:06d}}}.tar"


def sniff_ext(data: bytes) -> str:
    """The image format of encoded bytes, from their magic number (the source's own encoding is kept)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise BadValue(f"not a PNG, JPEG or WebP image (first bytes {data[:12]!r})")


def check_key(key: str) -> str:
    """Keys become tar member names and index-file words: no dots (WebDataset splits the extension at the first
    dot), no path separators or whitespace, and short enough for a plain USTAR header."""
    if not key or len(key) > 80 or any(c in key for c in "./\\ \t\n") or not key.isascii():
        raise BadValue(f"sample key {key!r} is not usable (needs 1-80 ASCII characters without '.', '/', spaces)")
    return key


class _HashingFile:
    """A write-only file that hashes what passes through, so a shard's sha256 costs no second read."""

    def __init__(self, f):
        self.f, self.sha, self.pos = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.pos += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.pos


def _tarinfo(member: str, size: int) -> tarfile.TarInfo:
    """Fixed metadata (mtime 0, root, read-only) so the same input writes byte-identical shards."""
    info = tarfile.TarInfo(member)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "root", "root"
    return info


class ShardWriter:
    """Writes one tar and its DALI index under temporary names; `close()` renames both and returns the shard's
    manifest entry. `abort()` (or an exception inside a `with` block) removes the partial files."""

    def __init__(self, path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        self.file = open(self.tmp, "wb")
        self.hashed = _HashingFile(self.file)
        self.tar = tarfile.open(fileobj=self.hashed, mode="w", format=tarfile.USTAR_FORMAT)
        self.lines: list[str] = []
        self.keys: list[str] = []

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """One sample: `members` maps extension -> bytes, written in the given order (image first)."""
        words = []
        for ext, data in members.items():
            member = f"{check_key(key)}.{ext}"
            info = _tarinfo(member, len(data))
            offset = self.tar.offset + len(info.tobuf(self.tar.format, self.tar.encoding, self.tar.errors))
            self.tar.addfile(info, io.BytesIO(data))
            words.append(f"{ext} {offset} {len(data)} {member}")
        self.lines.append(" ".join(words))
        self.keys.append(key)

    def close(self) -> dict:
        if not self.keys:
            self.abort()
            raise BadValue(f"{self.path}: a shard needs at least one sample")
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        idx = self.path.with_name(index_name(self.path.name))
        os.replace(self.tmp, self.path)
        write_atomic(idx, f"{INDEX_VERSION} {len(self.lines)}\n" + "\n".join(self.lines) + "\n")
        return {"tar": self.path.name, "index": idx.name, "num_samples": len(self.keys),
                "sha256": self.hashed.sha.hexdigest(), "bytes": self.hashed.pos,
                "first_key": self.keys[0], "last_key": self.keys[-1]}

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.abort()


def write_manifest(root, manifest: dict) -> Path:
    """Written last: its presence is what marks the split complete."""
    path = manifest_path(root, manifest["name"], manifest["split"])
    write_atomic(path, json.dumps(manifest, indent=1) + "\n")
    return path


def load_manifest(root, name: str, split: str) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise MissingFile(f"shard directory {root} does not exist (write it with `python -m data_shards`)")
    path = manifest_path(root, name, split)
    if not path.is_file():
        found = sorted(p.name for p in root.glob("*.json"))
        raise MissingFile(f"no manifest {path} (a set without its manifest is incomplete: its writer did not "
                                f"finish); manifests there: {found or 'none'}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise BadValue(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def read_index(path) -> list[list[tuple[str, int, int, str]]]:
    """Per sample, its components as (ext, data offset, size, member name), from a `v1.2` index file."""
    path = Path(path)
    lines = path.read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION:
        raise BadValue(f"{path}: not a DALI webdataset index (header {lines[:1]}, expected '{INDEX_VERSION} N')")
    samples = []
    for line in lines[1:int(head[1]) + 1]:
        w = line.split()
        if len(w) % 4:
            raise BadValue(f"{path}: malformed line {line!r}")
        samples.append([(w[i], int(w[i + 1]), int(w[i + 2]), w[i + 3]) for i in range(0, len(w), 4)])
    if len(samples) != int(head[1]):
        raise BadValue(f"{path}: header says {head[1]} samples, found {len(samples)} lines")
    return samples


def sha256_file(path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


class ShardSet:
    """Random access to the samples of one split: (shard, byte offset, size) per sample from the index files.

    Reads use `os.pread` on file descriptors opened per process, so a DataLoader's forked workers never share a
    file position. Construction checks that every shard exists with the manifest's size and sample count
    (cheap); `verify()` also checks the sha256 of every shard.
    """

    def __init__(self, root, name: str, split: str):
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self.root, self.name, self.split = Path(root), name, split
        self.manifest = load_manifest(root, name, split)
        self.tars = [self.root / s["tar"] for s in self.manifest["shards"]]
        shard_of, img, cls, keys = [], [], [], []
        for i, entry in enumerate(self.manifest["shards"]):
            for comps in self._shard_samples(entry):
                by_ext = {c[0]: c for c in comps}
                image = next((by_ext[e] for e in IMAGE_EXTS if e in by_ext), None)
                if image is None:
                    raise BadValue(f"{self.tars[i]}: sample {comps[0][3]} has no image ({', '.join(by_ext)})")
                shard_of.append(i)
                img.append(image[1:3])
                cls.append(by_ext["cls"][1:3] if "cls" in by_ext else (-1, 0))
                keys.append(image[3].split(".", 1)[0])
        self.shard_of = np.asarray(shard_of, np.int32)
        self.image_loc = np.asarray(img, np.int64).reshape(-1, 2)
        self.label_loc = np.asarray(cls, np.int64).reshape(-1, 2)
        self.keys = keys
        self.has_labels = bool((self.label_loc[:, 0] >= 0).all()) and len(keys) > 0

    def _shard_samples(self, entry: dict) -> list:
        tar, idx = self.root / entry["tar"], self.root / entry["index"]
        for p in (tar, idx):
            if not p.is_file():
                raise MissingFile(f"{p} is listed in {manifest_path(self.root, self.name, self.split)} "
                                        f"but missing")
        if tar.stat().st_size != entry["bytes"]:
            raise BadValue(f"{tar}: {tar.stat().st_size} bytes, the manifest says {entry['bytes']} (damaged or "
                             f"replaced shard)")
        samples = read_index(idx)
        if len(samples) != entry["num_samples"]:
            raise BadValue(f"{idx}: {len(samples)} samples, the manifest says {entry['num_samples']}")
        return samples

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: open its own descriptors
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            self._fds[shard] = os.open(self.tars[shard], os.O_RDONLY)
        return self._fds[shard]

    def _pread(self, i: int, loc: np.ndarray) -> bytes:
        offset, size = int(loc[i, 0]), int(loc[i, 1])
        data = os.pread(self._fd(int(self.shard_of[i])), size, offset)
        if len(data) != size:
            raise OSError(f"{self.where(i)}: short read ({len(data)} of {size} bytes)")
        return data

    def image_bytes(self, i: int) -> bytes:
        return self._pread(i, self.image_loc)

    def label(self, i: int) -> int:
        """The `.cls` label as an int; -1 when the sample has none."""
        if self.label_loc[i, 0] < 0:
            return -1
        text = self._pread(i, self.label_loc)
        try:
            return int(text.decode("ascii").strip())
        except ValueError:
            raise BadValue(f"{self.where(i)}: label {text[:20]!r} is not an integer") from None

    def labels(self, indices=None) -> np.ndarray:
        indices = range(self.num_samples) if indices is None else indices
        return np.asarray([self.label(int(i)) for i in indices], np.int64)

    def where(self, i: int) -> str:
        """`shard.tar:key`: how errors name a sample."""
        return f"{self.tars[int(self.shard_of[i])]}:{self.keys[i]}"

    def verify(self) -> list[str]:
        """Problems found by checking every shard's sha256 against the manifest (empty when all match)."""
        problems = []
        for tar, entry in zip(self.tars, self.manifest["shards"]):
            digest = sha256_file(tar)
            if digest != entry["sha256"]:
                problems.append(f"{tar}: sha256 {digest[:16]}... does not match the manifest's "
                                f"{entry['sha256'][:16]}... (shard damaged)")
        return problems

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __del__(self):
        self.close()

    def __getstate__(self):  # descriptors are per process
        return {**self.__dict__, "_fds": {}}
