"""Images end to end: shards from the real MNIST files, a tiny NCSN++ run on 2 DeepSpeed ranks, sampling on 1 and 2
ranks (the same images by per-sample seeds), and a tiny MNIST NICE run with its exact samples."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from ddaebm.checkpoint import latest_checkpoint
from ddaebm.training.preemption import EXIT_PREEMPTED
from tests.conftest import CONFIGS, ROOT
from tests.dist_utils import ds_env, run_ranks, wait_all, wait_for_stats

MNIST = ROOT.parent / "shared" / "data" / "mnist-10k"
pytestmark = pytest.mark.skipif(not MNIST.is_dir(), reason="../shared/data/mnist-10k not present")


def _shards(tmp_path, source: str, name: str, count: int):
    out = tmp_path / name
    r = subprocess.run([sys.executable, "-m", "data_shards", source, "--input", str(MNIST), "--out", str(out),
                        "--name", name, "--split", "train", "--num-samples" if source == "stackedmnist" else "--limit",
                        str(count)], cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


def _ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _images(folder):
    files = sorted(folder.glob("samples-*.npz"))
    idx = np.concatenate([np.load(f)["indices"] for f in files])
    return idx, np.concatenate([np.load(f)["images"] for f in files])


def test_ncsnpp_through_shards_on_two_deepspeed_ranks(tmp_path):
    pytest.importorskip("deepspeed")
    shards = _shards(tmp_path, "stackedmnist", "stackedmnist", 64)
    run = tmp_path / "run"
    args = ["train", str(CONFIGS / "tiny" / "cifar10.yaml"), "--run-dir", str(run), "--steps", "4",
            "data.dataset=stackedmnist", f"data.root={shards}", "dist.backend=deepspeed", "dist.zero_stage=1",
            "train.ckpt_every=4", "train.log_every=1", "train.snapshot_every=4", "data.loader=pil"]
    _ok(run_ranks(args, 2, tmp_path, timeout=600))
    for name in ("reals.png", "snapshots/fakes-000000004.png", "checkpoints/latest", "stats.jsonl"):
        assert (run / name).exists(), name
    assert len((run / "stats.jsonl").read_text().splitlines()) == 4

    # Under torchrun --num is spelled --num-samples (torchrun would read --num as its --numa-binding).
    _ok(run_ranks(["sample", str(run), "--num-samples", "10", "--out", str(tmp_path / "s2"), "--batch", "3"], 2,
                  tmp_path))
    _ok(run_ranks(["sample", str(run), "--num", "10", "--out", str(tmp_path / "s1"), "--batch", "7"], 1, tmp_path))
    idx1, img1 = _images(tmp_path / "s1")
    idx2, img2 = _images(tmp_path / "s2")
    assert idx1.tolist() == idx2.tolist() == list(range(10))
    assert img1.shape == (10, 32, 32, 3) and img1.dtype == np.uint8
    # Same seeds per sample: equal up to a rounding step where batched kernels sum in another order.
    assert np.abs(img1.astype(int) - img2.astype(int)).max() <= 1
    assert (tmp_path / "s2" / "grid.png").is_file()


def test_mnist_nice_tiny_run_and_exact_samples(tmp_path, cli_env):
    shards = _shards(tmp_path, "mnist", "mnist", 128)
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "ddaebm", "train", str(CONFIGS / "tiny" / "mnist_nice.yaml"),
                        "--run-dir", str(run), "--steps", "6", f"data.root={shards}", "train.snapshot_every=6",
                        "train.ckpt_every=6"], cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300)
    _ok(r)
    for name in ("reals.png", "snapshots/fakes-000000006.png", "snapshots/exact-000000006.png"):
        assert (run / name).is_file(), name
    r = subprocess.run([sys.executable, "-m", "ddaebm", "sample", str(run), "--num", "5", "--out", str(tmp_path / "s")],
                       cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300)
    _ok(r)
    _, img = _images(tmp_path / "s")
    assert img.shape == (5, 28, 28, 1)


def test_image_run_resumes_bit_identically(tmp_path, cli_env):
    """Shard stream position, dropout RNG, EMA and optimizers all carry over: 2 + 2 steps equal 4 steps."""
    import torch

    shards = _shards(tmp_path, "stackedmnist", "stackedmnist", 48)
    base = ["train", str(CONFIGS / "tiny" / "cifar10.yaml"), "--steps", "4", "data.dataset=stackedmnist",
            f"data.root={shards}", "data.batch=4", "train.ckpt_every=2", "train.snapshot_every=100",
            "data.flip=true"]

    def run(name, *extra):
        r = subprocess.run([sys.executable, "-m", "ddaebm", *base, "--run-dir", str(tmp_path / name), *extra],
                           cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300)
        _ok(r)

    run("whole")
    run("split", "--slice-steps", "2")
    run("split")
    load = lambda name: torch.load(tmp_path / name / "checkpoints" / "step-000000004" / "state.pt",  # noqa: E731
                                   map_location="cpu", weights_only=True)
    a, b = load("whole"), load("split")
    for engine in ("energy", "generator"):
        for key, value in a["engines"][engine]["module"].items():
            assert torch.equal(value, b["engines"][engine]["module"][key]), (engine, key)
    for name, shadow in a["ema"].items():
        for key, value in shadow.items():
            assert torch.equal(value, b["ema"][name][key]), ("ema", name, key)
    assert a["stream"] == b["stream"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_to_the_process_group_spares_the_decoding_workers(tmp_path, sig):
    """SLURM's preemption and `kill -- -PGID` signal the decoding workers too: the run still checkpoints and ends 143
    (a worker killed by the signal used to make the DataLoader raise in the trainer first)."""
    shards = _shards(tmp_path, "stackedmnist", "stackedmnist", 64)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ddaebm", "train", str(CONFIGS / "tiny" / "cifar10.yaml"),
                             "--run-dir", str(run), "--steps", "100000", "data.dataset=stackedmnist",
                             f"data.root={shards}", "data.loader=pil", "data.workers=1", "train.log_every=1",
                             "train.ckpt_every=100000", "train.snapshot_every=100000"],
                            cwd=tmp_path, env=ds_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_stats(run, 2, [proc], timeout=300)
    os.killpg(proc.pid, sig)
    assert wait_all([proc], 120) == [EXIT_PREEMPTED], proc.stderr.read()[-3000:]
    assert int(latest_checkpoint(run).name.split("-")[1]) >= 2
