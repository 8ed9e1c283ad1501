"""Shard writing (data_shards) and the shard format (ddaebm/data/shards.py): every source round-trips bytes, labels
and counts; index files are DALI's; damage is reported by shard and key; a killed writer leaves no complete set."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_shards.__main__ import main as shards_main
from data_shards.sources import CELEBA64_BOX, read_idx
from data_shards.verify import verify_dir
from data_shards.writer import Record, write_split
from ddaebm.data.shards import ShardSet, load_manifest, manifest_path, read_index, shard_name
from tests.conftest import ROOT

MNIST = Path("/work/shared/data/mnist-10k")
needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason="needs ../shared/data/mnist-10k")


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def encoded(a: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt, **kw)
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def read_all(root, name, split) -> tuple[list[bytes], np.ndarray, ShardSet]:
    s = ShardSet(root, name, split)
    return [s.image_bytes(i) for i in range(s.num_samples)], s.labels(), s


def rand_images(n: int, h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (n, h, w, channels) if channels > 1 else (n, h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_folder_round_trip_keeps_bytes_and_class_labels(tmp_path):
    src, imgs = tmp_path / "imgs", rand_images(40, 32, 32)
    for i, a in enumerate(imgs):
        d = src / ("cat" if i % 2 else "dog")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:03d}.png").write_bytes(png(a))
    assert shards_main(["folder", "--input", str(src), "--out", str(tmp_path / "out"), "--name", "toy",
                        "--split", "train", "--shard-size", "16", "--class-dirs"]) == 0
    m = load_manifest(tmp_path / "out", "toy", "train")
    assert [s["num_samples"] for s in m["shards"]] == [16, 16, 8] and m["num_samples"] == 40
    assert m["labels"]["names"] == ["cat", "dog"] and (m["image"]["height"], m["image"]["width"]) == (32, 32)
    data, labels, s = read_all(tmp_path / "out", "toy", "train")
    files = sorted(src.rglob("*.png"))  # sorted by path: cat/... then dog/...
    assert data == [f.read_bytes() for f in files]
    assert labels.tolist() == [0 if f.parent.name == "cat" else 1 for f in files]
    assert verify_dir(tmp_path / "out", log=lambda *_: None) == []


def test_index_is_what_dali_wds2idx_writes(tmp_path):
    recs = [Record(png(a), "png", i % 10) for i, a in enumerate(rand_images(12, 8, 8))]
    write_split(recs, tmp_path, "t", "train", {"kind": "test"}, None, shard_size=5)
    ours = tmp_path / "t-train-000001.idx"
    theirs = tmp_path / "wds2idx.idx"
    subprocess.run([str(Path(sys.executable).parent / "wds2idx"), str(tmp_path / "t-train-000001.tar"), str(theirs)],
                   check=True, capture_output=True)
    assert ours.read_bytes() == theirs.read_bytes()
    assert [c[0] for c in read_index(ours)[0]] == ["png", "cls"]


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_shards_read_by_the_webdataset_library(tmp_path):
    import gc

    import webdataset as wds

    imgs = rand_images(10, 8, 8)
    m = write_split([Record(png(a), "png", i) for i, a in enumerate(imgs)], tmp_path, "t", "train", {}, None, 4)
    ds = wds.WebDataset(str(tmp_path / m["pattern"]), shardshuffle=False, empty_check=False)
    samples = list(ds)
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(10)]
    assert [int(s["cls"]) for s in samples] == list(range(10))
    assert all(np.array_equal(decoded(s["png"]), a) for s, a in zip(samples, imgs))
    del ds
    gc.collect()  # webdataset 1.0.2 leaves its last tar open until collected


def write_cifar(root: Path, per_batch: int = 6) -> dict:
    root.mkdir(parents=True)
    batches = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        imgs = rand_images(per_batch, 32, 32, seed=k)
        labels = [(k + j) % 10 for j in range(per_batch)]
        data = imgs.transpose(0, 3, 1, 2).reshape(per_batch, 3072)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        batches[name] = (imgs, labels)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return batches


def test_cifar10_round_trip(tmp_path):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        assert shards_main(["cifar10", "--input", str(tmp_path / "cifar-10-batches-py"), "--out",
                            str(tmp_path / "out"), "--name", "cifar10", "--split", split, "--shard-size", "7"]) == 0
        data, labels, _ = read_all(tmp_path / "out", "cifar10", split)
        imgs = np.concatenate([batches[n][0] for n in names])
        assert len(data) == len(imgs) and all(np.array_equal(decoded(d), a) for d, a in zip(data, imgs))
        assert labels.tolist() == sum((batches[n][1] for n in names), [])
    assert load_manifest(tmp_path / "out", "cifar10", "train")["labels"]["names"][:2] == ["c0", "c1"]


def test_lsun_lmdb_keeps_webp_and_jpeg_bytes(tmp_path):
    import lmdb

    imgs = rand_images(6, 40, 56)
    values = {f"{k:040x}".encode(): encoded(a, "WEBP" if k % 2 else "JPEG", quality=90) for k, a in enumerate(imgs)}
    env = lmdb.open(str(tmp_path / "church_outdoor_train_lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for k, v in values.items():
            txn.put(k, v)
    env.close()
    assert shards_main(["lsun", "--input", str(tmp_path / "church_outdoor_train_lmdb"), "--out", str(tmp_path / "o"),
                        "--name", "church", "--limit", "5"]) == 0
    data, labels, s = read_all(tmp_path / "o", "church", "train")
    keys = sorted(values)[:5]
    assert data == [values[k] for k in keys] and (labels == -1).all()
    assert load_manifest(tmp_path / "o", "church", "train")["image"]["exts"] == ["jpg", "webp"]
    assert [s._pread(i, s.image_loc)[:4] for i in range(2)] == [b"\xff\xd8\xff\xe0", b"RIFF"]


def test_lsun_reencoded_to_jpeg_for_the_gpu_decoder(tmp_path):
    """--jpeg-quality: WebP (and PNG) sources become 4:4:4 JPEGs at that quality, which DALI's `mixed` decoder
    takes on the GPU; a JPEG source is kept byte for byte; a quality outside 1-100 is refused."""
    import lmdb

    imgs = rand_images(4, 40, 56, seed=3)
    smooth = (imgs.astype(np.float32) * 0 + np.linspace(0, 255, 56)[None, None, :, None]).astype(np.uint8)
    values = {f"{k:040x}".encode(): encoded(a, "WEBP" if k % 2 else "JPEG", quality=100, lossless=k % 2 == 1)
              for k, a in enumerate(smooth)}
    env = lmdb.open(str(tmp_path / "lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for k, v in values.items():
            txn.put(k, v)
    env.close()
    args = ["lsun", "--input", str(tmp_path / "lmdb"), "--out", str(tmp_path / "o"), "--name", "church"]
    assert shards_main([*args, "--jpeg-quality", "0"]) == 2
    assert shards_main([*args, "--jpeg-quality", "95"]) == 0
    data, _, _ = read_all(tmp_path / "o", "church", "train")
    keys = sorted(values)
    assert load_manifest(tmp_path / "o", "church", "train")["image"]["exts"] == ["jpg"]
    assert data[0] == values[keys[0]]  # a JPEG source, kept
    assert data[1][:3] == b"\xff\xd8\xff" and np.abs(decoded(data[1]).astype(int) - smooth[1]).mean() < 2


def test_celeba_crop_box_then_resize_to_64(tmp_path):
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    imgs = rand_images(5, 218, 178)
    for i, a in enumerate(imgs):
        (folder / f"{i + 1:06d}.jpg").write_bytes(encoded(a, "JPEG", quality=95))
    (tmp_path / "part.txt").write_text("".join(f"{i + 1:06d}.jpg {i % 2}\n" for i in range(5)))
    assert shards_main(["celeba", "--input", str(folder), "--out", str(tmp_path / "o"), "--name", "celeba64",
                        "--partition", str(tmp_path / "part.txt"), "--split", "train"]) == 0
    data, _, _ = read_all(tmp_path / "o", "celeba64", "train")
    assert len(data) == 3  # partition 0 = images 1, 3, 5
    for d, name in zip(data, ["000001.jpg", "000003.jpg", "000005.jpg"]):
        ref = Image.open(folder / name).convert("RGB").crop(CELEBA64_BOX).resize((64, 64), Image.BILINEAR)
        assert np.array_equal(decoded(d), np.asarray(ref))
    assert load_manifest(tmp_path / "o", "celeba64", "train")["image"]["height"] == 64


@needs_mnist
def test_mnist_idx_round_trip_and_uncompressed_idx(tmp_path):
    images = read_idx(MNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (2000, 28, 28) and labels.shape == (2000,)
    plain = tmp_path / "plain"
    plain.mkdir()
    import gzip

    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (plain / stem).write_bytes(gzip.decompress((MNIST / f"{stem}.gz").read_bytes()))
    for src in (MNIST, plain):
        out = tmp_path / f"out-{src.name}"
        assert shards_main(["mnist", "--input", str(src), "--out", str(out), "--split", "test", "--limit", "300",
                            "--shard-size", "128"]) == 0
        data, got, _ = read_all(out, "mnist", "test")
        assert len(data) == 300 and got.tolist() == labels[:300].tolist()
        assert all(np.array_equal(decoded(d), a) for d, a in zip(data, images))
        assert load_manifest(out, "mnist", "test")["image"]["channels"] == 1


@needs_mnist
def test_stackedmnist_stacks_three_digits_as_rgb_padded_to_32(tmp_path):
    images = read_idx(MNIST / "train-images-idx3-ubyte.gz")
    digits = read_idx(MNIST / "train-labels-idx1-ubyte.gz").astype(np.int64)
    assert shards_main(["stackedmnist", "--input", str(MNIST), "--out", str(tmp_path), "--split", "train",
                        "--num-samples", "200", "--seed", "5"]) == 0
    data, labels, _ = read_all(tmp_path, "stackedmnist", "train")
    ids = np.random.default_rng(5).integers(0, len(images), size=(200, 3))
    assert labels.tolist() == (100 * digits[ids[:, 0]] + 10 * digits[ids[:, 1]] + digits[ids[:, 2]]).tolist()
    assert labels.max() > 255 and len(set(labels.tolist())) > 150
    for d, (a, b, c) in zip(data[:20], ids):
        x = decoded(d)
        assert x.shape == (32, 32, 3) and not x[:2].any() and not x[:, -2:].any()
        assert np.array_equal(x[2:30, 2:30], np.stack([images[a], images[b], images[c]], -1))
    m = load_manifest(tmp_path, "stackedmnist", "train")
    assert m["labels"]["num_classes"] == 1000 and m["source"]["seed"] == 5


def small_set(root: Path, n: int = 12, shard_size: int = 5, name: str = "t") -> list[np.ndarray]:
    imgs = list(rand_images(n, 16, 16))
    write_split([Record(png(a), "png", i) for i, a in enumerate(imgs)], root, name, "train", {}, None, shard_size)
    return imgs


def test_flipped_byte_fails_the_checksum_naming_the_shard(tmp_path):
    small_set(tmp_path)
    tar = tmp_path / shard_name("t", "train", 1)
    raw = bytearray(tar.read_bytes())
    raw[700] ^= 0x01
    tar.write_bytes(bytes(raw))
    problems = verify_dir(tmp_path, log=lambda *_: None)
    assert len(problems) == 1 and "t-train-000001.tar" in problems[0] and "sha256" in problems[0]
    r = subprocess.run([sys.executable, "-m", "data_shards", "verify", str(tmp_path)], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 1 and "t-train-000001.tar" in r.stdout
    from ddaebm.data.images import ImageStream

    with pytest.raises(ValueError, match="t-train-000001.tar.*sha256"):
        ImageStream(tmp_path, "t", "train", batch=2, resolution=16, loader="pil", verify=True)


def test_garbage_sample_is_reported_with_its_key(tmp_path):
    from ddaebm.data.shards import ShardWriter, write_manifest

    imgs = rand_images(4, 8, 8)
    with ShardWriter(tmp_path / shard_name("g", "train", 0)) as w:
        for i, a in enumerate(imgs):
            w.add(f"{i:08d}", {"png": png(a) if i != 2 else b"\x89PNG\r\n\x1a\nthis is not an image", "cls": b"1"})
        entry = w.close()
    write_manifest(tmp_path, {"format": "ddaebm-shards/1", "name": "g", "split": "train", "num_samples": 4,
                              "image": {"height": 8, "width": 8}, "shards": [entry]})
    assert verify_dir(tmp_path, log=lambda *_: None) == []  # checksums fine: the damage was written in
    problems = verify_dir(tmp_path, decode=True, log=lambda *_: None)
    assert len(problems) == 1 and "g-train-000000.tar:00000002" in problems[0]


def test_truncated_or_missing_shard_named_on_open(tmp_path):
    small_set(tmp_path)
    tar = tmp_path / shard_name("t", "train", 2)
    tar.write_bytes(tar.read_bytes()[:-600])
    with pytest.raises(ValueError, match="t-train-000002.tar"):
        ShardSet(tmp_path, "t", "train")
    tar.unlink()
    with pytest.raises(FileNotFoundError, match="t-train-000002.tar"):
        ShardSet(tmp_path, "t", "train")


def test_existing_split_is_not_overwritten_silently(tmp_path):
    small_set(tmp_path)
    with pytest.raises(FileExistsError, match="overwrite"):
        small_set(tmp_path)
    imgs = rand_images(3, 16, 16, seed=9)
    write_split([Record(png(a), "png") for a in imgs], tmp_path, "t", "train", {}, None, 5, overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("t-train-*")) == ["t-train-000000.idx", "t-train-000000.tar"]
    assert ShardSet(tmp_path, "t", "train").num_samples == 3


def test_failing_source_leaves_no_manifest_and_no_partial_file(tmp_path):
    def recs():
        for i, a in enumerate(rand_images(8, 8, 8)):
            if i == 7:
                raise RuntimeError("source broke")
            yield Record(png(a), "png")

    with pytest.raises(RuntimeError, match="source broke"):
        write_split(recs(), tmp_path, "t", "train", {}, None, shard_size=3)
    assert not manifest_path(tmp_path, "t", "train").exists() and not list(tmp_path.glob(".*partial"))
    with pytest.raises(FileNotFoundError, match="did not finish"):
        ShardSet(tmp_path, "t", "train")


KILLED_WRITER = """
import io, sys, time
import numpy as np
from PIL import Image
from data_shards.writer import Record, write_split
def recs():
    for i in range(1000):
        if i == 7:
            print("ready", flush=True)
            time.sleep(60)
        buf = io.BytesIO(); Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
        yield Record(buf.getvalue(), "png")
write_split(recs(), sys.argv[1], "k", "train", {}, None, shard_size=5)
"""


def test_killed_writer_leaves_no_set_that_looks_complete(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.2)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        p.stdout.close()
    assert (tmp_path / "k-train-000000.tar").exists() and not manifest_path(tmp_path, "k", "train").exists()
    assert list(tmp_path.glob(".k-train-000001.tar.partial"))
    with pytest.raises(FileNotFoundError, match="did not finish"):
        ShardSet(tmp_path, "k", "train")
    problems = verify_dir(tmp_path, log=lambda *_: None)
    assert any("no manifest" in p for p in problems) and any("partial" in p for p in problems)


def test_cli_errors_name_the_path(tmp_path, capsys):
    assert shards_main(["mnist", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
    assert shards_main(["verify", str(tmp_path)]) == 1


def test_manifest_is_json_with_sha256_per_shard(tmp_path):
    small_set(tmp_path, n=7, shard_size=3)
    m = json.loads((tmp_path / "t-train.json").read_text())
    assert m["num_shards"] == 3 and [s["num_samples"] for s in m["shards"]] == [3, 3, 1]
    from ddaebm.data.shards import sha256_file

    assert all(sha256_file(tmp_path / s["tar"]) == s["sha256"] for s in m["shards"])
    assert m["pattern"] == "t-train-{000000..000002}.tar"
