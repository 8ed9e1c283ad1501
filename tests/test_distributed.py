"""The DeepSpeed backend on several ranks (real DeepSpeed, gloo, CPU): equivalence, resume, preemption, faults.

Tolerances. Every rank draws the global batch's randomness and keeps its slice (ddaebm/data/stream.py,
draw_step_batch), so 2 ranks and 1 rank at the same global batch compute the same losses up to the order of
floating-point sums: the gradient all-reduce averages two half-batch means instead of one full-batch mean.
Measured: |Δ| ≤ 1e-5 on logged losses of magnitude ≤ 40 over 10 steps, ≤ 1e-7 on weights. The tolerances
below (2e-4 relative, 1e-5 on weights) leave room and would still catch a wrong batch split, a missing
gradient average (a factor 2) or a lost optimizer state. The generator's BatchNorm is off here: its batch
statistics are per rank, as in DDP without SyncBatchNorm, so with it the trajectories differ by design.
"""

import signal
import time

import pytest

from ddaebm.training.preemption import EXIT_PREEMPTED
from tests.dist_utils import (final_weights, max_weight_diff, run_ranks, spawn_ranks, stats, train_args, wait_all,
                              wait_for_stats)

pytest.importorskip("deepspeed")
LOSSES = ("loss_energy", "loss_gen", "f_real", "f_fake", "E_F", "L_rec")


def _ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_two_ranks_match_one_rank(tmp_path):
    extra = ["dist.zero_stage=2", "train.ckpt_every=8"]
    _ok(run_ranks(train_args(tmp_path / "one", 8, extra), 1, tmp_path))
    r = run_ranks(train_args(tmp_path / "two", 8, extra), 2, tmp_path)
    _ok(r)
    one, two = stats(tmp_path / "one"), stats(tmp_path / "two")
    assert [s["step"] for s in two] == list(range(1, 9))
    for a, b in zip(one, two):
        for key in LOSSES:
            assert b[key] == pytest.approx(a[key], rel=2e-4, abs=1e-5), (a["step"], key)
    assert max_weight_diff(final_weights(tmp_path / "one", 8), final_weights(tmp_path / "two", 8)) < 1e-5
    # Only rank 0 writes the run dir's files: one stats row per step, not two.
    assert len(two) == 8 and r.stdout.count("starting step 0/8") == 1


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(tmp_path, first, second):
    """ZeRO 1 shards saved on `first` ranks resume on `second` through an automatic universal checkpoint."""
    extra = ["dist.zero_stage=1", "train.ckpt_every=5"]
    _ok(run_ranks(train_args(tmp_path / "ref", 10, extra), 1, tmp_path))
    _ok(run_ranks(train_args(tmp_path / "split", 10, extra) + ["--slice-steps", "5"], first, tmp_path))
    r = run_ranks(train_args(tmp_path / "split", 10, extra), second, tmp_path)
    _ok(r)
    assert "resumed at step 5/10" in r.stdout
    converted = tmp_path / "split" / "checkpoints" / "step-000000005" / "engines" / "energy" / "ds_universal"
    assert converted.is_dir()  # cached beside the shards for the next resume
    assert max_weight_diff(final_weights(tmp_path / "ref", 10), final_weights(tmp_path / "split", 10)) < 1e-5
    ref, split = stats(tmp_path / "ref"), stats(tmp_path / "split")
    for a, b in zip(ref[5:], split[5:]):  # the continued steps, optimizer state included
        assert b["loss_gen"] == pytest.approx(a["loss_gen"], rel=2e-4, abs=1e-5)


def test_sigterm_checkpoints_and_resumes(tmp_path):
    """SIGTERM to every rank (as a scheduler sends it): finish the step, checkpoint, exit 143; rerun finishes."""
    run = tmp_path / "run"
    args = train_args(run, 100000, ["train.ckpt_every=100000", "train.log_every=5"])
    procs = spawn_ranks(args, 2, tmp_path, tmp_path)
    wait_for_stats(run, 2, procs)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    codes = wait_all(procs, 120)
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], (codes, (tmp_path / "rank0.log").read_text()[-3000:])
    pointer = (run / "checkpoints" / "latest").read_text().strip()
    step = int(pointer.split("-")[1])
    assert step >= 10 and (run / "checkpoints" / pointer / "manifest.json").is_file()
    assert "preempted (SIGTERM)" in (tmp_path / "rank0.log").read_text()
    r = run_ranks(train_args(run, step + 3, ["train.ckpt_every=100000", "train.log_every=5"]), 1, tmp_path)
    _ok(r)
    assert f"resumed at step {step}/{step + 3}" in r.stdout
    assert (run / "checkpoints" / f"step-{step + 3:09d}").is_dir()


@pytest.mark.parametrize("zero", [0, 1])
def test_killed_rank_fails_fast_and_rerun_recovers(tmp_path, zero):
    """kill -9 of rank 1: rank 0 fails within the collective timeout (no hang); the rerun reaches the end and
    matches an uninterrupted run (the toy path is deterministic). ZeRO 0 exchanges gradients through shared
    memory (ddaebm/training/reduce.py), ZeRO 1 through DeepSpeed's gloo collectives."""
    extra = [f"dist.zero_stage={zero}", "train.ckpt_every=10", "dist.timeout_s=20"]
    run = tmp_path / "run"
    procs = spawn_ranks(train_args(run, 40, extra), 2, tmp_path, tmp_path)
    while not (run / "checkpoints" / "latest").is_file():
        assert all(p.poll() is None for p in procs), [p.poll() for p in procs]
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    codes = wait_all(procs, 90)
    assert codes[0] not in (None, 0), (codes, (tmp_path / "rank0.log").read_text()[-2000:])
    assert time.monotonic() - t0 < 60
    saved = int((run / "checkpoints" / "latest").read_text().split("-")[1])
    if saved == 40:
        pytest.skip("the run finished before the kill landed")
    r = run_ranks(train_args(run, 40, extra), 2, tmp_path)
    _ok(r)
    assert f"resumed at step {saved}/40" in r.stdout
    _ok(run_ranks(train_args(tmp_path / "ref", 40, extra), 2, tmp_path))
    assert max_weight_diff(final_weights(tmp_path / "ref", 40), final_weights(run, 40)) < 1e-6


def test_bf16_zero2_with_ema_and_clipping_runs(tmp_path):
    """bf16 autocast networks with fp32 weights/losses/R1, ZeRO 2, EMA outside the engines, clipping."""
    extra = ["dist.zero_stage=2", "dist.precision=bf16", "dist.grad_clip=1.0", "optim.ema_decay=0.9",
             "train.ckpt_every=6"]
    _ok(run_ranks(train_args(tmp_path / "run", 6, extra), 2, tmp_path))
    rows = stats(tmp_path / "run")
    assert len(rows) == 6 and all(abs(r[k]) < 1e3 for r in rows for k in LOSSES) and rows[-1]["nonfinite"] == 0
    r = run_ranks(["sample", str(tmp_path / "run"), "--num", "9", "--out", str(tmp_path / "x.npy")], 1, tmp_path)
    _ok(r)
