"""Starting a job on several ranks (ddaebm/training/resume.py, issue 20 items 2-3): rank 0 alone picks and verifies
the checkpoint and the others load its choice, even where their own view of the run dir differs; a bad input only
rank 0 can see (another experiment, a held lock) ends every rank with one line and exit 2."""

import shutil
import subprocess
import sys

import pytest

from ddaebm.rundir import RunLock
from tests.dist_utils import ds_env, final_weights, max_weight_diff, run_ranks, train_args, wait_all

pytest.importorskip("deepspeed")
EXTRA = ["train.ckpt_every=5", "train.keep_ckpts=0"]


def _ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _spawn(args, cwds, log_dir):
    """One process per rank with torchrun's variables, rank r started in cwds[r] (its own view of a relative
    --run-dir)."""
    from ddaebm.distributed import free_port

    port, procs, logs = str(free_port()), [], []
    for rank, cwd in enumerate(cwds):
        env = ds_env() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(cwds)),
                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        logs.append(log_dir / f"rank{rank}.log")
        procs.append(subprocess.Popen([sys.executable, "-m", "ddaebm", *args], cwd=cwd, env=env,
                                      stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT))
    return procs, logs


def test_every_rank_loads_the_checkpoint_rank_0_chose(tmp_path):
    """Rank 1 starts where `run` holds a newer checkpoint (step 15) than rank 0's (step 10): both resume from rank
    0's step 10, and the result equals a 2-rank resume where both see the same files."""
    a, b, ref = (tmp_path / n for n in ("a", "b", "ref"))
    for d in (a, b, ref):
        d.mkdir()
    _ok(run_ranks(train_args("run", 10, EXTRA), 1, a))
    shutil.copytree(a / "run", ref / "run")
    shutil.copytree(a / "run", b / "run")
    _ok(run_ranks(train_args("run", 15, EXTRA), 1, b))  # rank 1's view: a newer checkpoint
    procs, logs = _spawn(train_args("run", 20, EXTRA), [a, b], tmp_path)
    codes = wait_all(procs, 240)
    assert codes == [0, 0], (codes, logs[0].read_text()[-3000:], logs[1].read_text()[-3000:])
    assert "resumed at step 10/20" in logs[0].read_text()
    _ok(run_ranks(train_args("run", 20, EXTRA), 2, ref))
    assert max_weight_diff(final_weights(ref / "run", 20), final_weights(a / "run", 20)) < 1e-6


def _one_error_line(log, text):
    lines = [line for line in log.read_text().splitlines() if line.startswith("ddaebm: error:")]
    assert len(lines) == 1 and text in lines[0], log.read_text()[-3000:]


def test_a_bad_input_rank_0_finds_ends_every_rank(tmp_path):
    _ok(run_ranks(train_args(tmp_path / "run", 5, EXTRA), 1, tmp_path))
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    procs, logs = _spawn(train_args(tmp_path / "run", 10, [*EXTRA, "loss.r1_gamma=0.5"]), [tmp_path] * 2, tmp_path)
    assert wait_all(procs, 240) == [2, 2]
    for log in logs:
        _one_error_line(log, "different experiment")
    procs, logs = _spawn(train_args(tmp_path / "run", 3, EXTRA), [tmp_path] * 2, tmp_path)
    assert wait_all(procs, 240) == [2, 2]
    for log in logs:
        _one_error_line(log, "below step 5")
    holder = RunLock(tmp_path / "run")
    holder.acquire()
    holder.record()
    try:
        procs, logs = _spawn(train_args(tmp_path / "run", 10, EXTRA), [tmp_path] * 2, tmp_path)
        assert wait_all(procs, 240) == [2, 2]
        for log in logs:
            _one_error_line(log, "in use by another trainer")
    finally:
        holder.release()
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before


def test_a_damaged_universal_conversion_is_redone(tmp_path):
    """ZeRO 1 written on 2 ranks, resumed on 1: the conversion is cached beside the shards with its own manifest;
    a damaged cache is converted again (not handed to DeepSpeed), an intact one is reused."""
    from ddaebm.checkpoint import verify_listed

    extra = ["dist.zero_stage=1", "train.ckpt_every=5", "train.keep_ckpts=0"]
    _ok(run_ranks(train_args("run", 10, extra) + ["--slice-steps", "5"], 2, tmp_path))
    _ok(run_ranks(train_args("run", 10, extra), 1, tmp_path))
    first = final_weights(tmp_path / "run", 10)
    cache = tmp_path / "run" / "checkpoints" / "step-000000005" / "engines" / "energy" / "ds_universal"
    assert verify_listed(cache)
    victim = next(cache.rglob("exp_avg.pt"))
    victim.write_bytes(victim.read_bytes()[:50])
    r = _ok(run_ranks(train_args("run", 10, extra) + ["--resume", "run/checkpoints/step-000000005"], 1, tmp_path))
    assert "resumed at step 5/10" in r.stdout and verify_listed(cache)
    assert max_weight_diff(first, final_weights(tmp_path / "run", 10)) < 1e-6
