"""Faults and the pieces of the distributed path that need no second process: corrupted checkpoints, NaN
losses, preemption of one process, rank discovery, and the per-rank slicing of the global batch."""

import signal
import subprocess
import sys

import pytest
import torch

from ddaebm.config import load_config
from ddaebm.distributed import DistEnv, _first_host, discover
from ddaebm.losses import draw_step_batch
from ddaebm.checkpoint import CheckpointWarning, latest_checkpoint
from ddaebm.training.loop import prepare_run, train
from ddaebm.training.preemption import EXIT_PREEMPTED, NonFiniteStop
from ddaebm.training.trainer import Phase, Trainer
from tests.conftest import CONFIGS, TINY
from tests.dist_utils import ds_env, run_ranks, train_args, wait_all, wait_for_stats

CFG = CONFIGS / "toy" / "25gaussians.yaml"


def _cfg(steps, extra=()):
    return load_config(CFG, TINY + ["train.eval_at_end=false", "train.ckpt_every=4", f"train.steps={steps}", *extra])


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_newest_checkpoint_falls_back(tmp_path, damage):
    train(_cfg(8), tmp_path / "run")
    newest = tmp_path / "run" / "checkpoints" / "step-000000008" / "state.pt"
    data = newest.read_bytes()
    flipped = data[:-9] + bytes([data[-9] ^ 1]) + data[-8:]
    newest.write_bytes(data[: len(data) // 2] if damage == "truncate" else flipped)
    assert latest_checkpoint(tmp_path / "run").name == "step-000000008"  # the pointer still names it
    with pytest.warns(CheckpointWarning, match="step-000000008"):
        state = prepare_run(_cfg(12), tmp_path / "run", "auto")
    assert state["step"] == 4
    assert train(_cfg(12), tmp_path / "run", state).step == 12


@pytest.mark.skipif(not __import__("importlib").util.find_spec("deepspeed"), reason="needs deepspeed")
def test_corrupted_engine_shard_falls_back(tmp_path):
    """A truncated DeepSpeed shard (not state.pt) is caught by the manifest too."""
    run = tmp_path / "run"
    r = run_ranks(train_args(run, 10, ["train.ckpt_every=5", "dist.zero_stage=1"]), 1, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    shard = next((run / "checkpoints" / "step-000000010" / "engines" / "generator").rglob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    r = run_ranks(train_args(run, 12, ["train.ckpt_every=5", "dist.zero_stage=1"]), 1, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "does not verify" in r.stderr and "100 bytes" in r.stderr and "resumed at step 5/12" in r.stdout
    assert (run / "checkpoints" / "corrupt" / "step-000000010").is_dir()


def _nan_from(step_first, step_last):
    """An energy loss that is NaN on iterations [step_first, step_last)."""
    def loss(t, b):
        from ddaebm.training.trainer import _energy_phase

        value, stats = _energy_phase(t, b)
        return (value * float("nan") if step_first <= t.step < step_last else value), stats
    return loss


def test_nonfinite_loss_skips_the_update(tmp_path):
    cfg = _cfg(6, ["train.log_every=1"])
    trainer = Trainer(cfg)
    trainer.phases[0] = Phase("energy", "energy", _nan_from(2, 4))
    for _ in range(2):
        trainer.train_step()
    before = {k: v.clone() for k, v in trainer.energy.state_dict().items()}
    trainer.train_step()
    trainer.train_step()
    assert all(torch.equal(before[k], v) for k, v in trainer.energy.state_dict().items())  # no update applied
    assert trainer.nonfinite_total == 2 and trainer.nonfinite_streak == 2
    trainer.train_step()
    assert trainer.nonfinite_streak == 0 and trainer.nonfinite_total == 2


def test_consecutive_nonfinite_losses_stop_the_run(tmp_path):
    cfg = _cfg(20, ["train.max_nonfinite=3"])
    trainer = Trainer(cfg)
    trainer.phases[0] = Phase("energy", "energy", _nan_from(6, 100))
    with pytest.raises(NonFiniteStop, match="3 consecutive"):
        train(cfg, tmp_path / "run", trainer=trainer)
    assert trainer.step == 9
    assert latest_checkpoint(tmp_path / "run").name == "step-000000004"  # nothing saved during the streak


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_stops_one_process_with_a_checkpoint(tmp_path, sig):
    run = tmp_path / "run"
    args = ["train", str(CFG), "--run-dir", str(run), "--steps", "1000000", *TINY, "train.log_every=5",
            "train.ckpt_every=1000000"]
    proc = subprocess.Popen([sys.executable, "-m", "ddaebm", *args], cwd=tmp_path, env=ds_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_stats(run, 1, [proc], timeout=120)
    proc.send_signal(sig)
    assert wait_all([proc], 60) == [EXIT_PREEMPTED], proc.stderr.read()[-2000:]
    step = int(latest_checkpoint(run).name.split("-")[1])
    assert step >= 5 and f"preempted ({sig.name})" in proc.stdout.read()


def test_rank_discovery():
    assert discover({}) == DistEnv(0, 1, 0)
    assert discover({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == DistEnv(1, 4, 1)
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08],x",
           "SLURM_JOB_ID": "12345"}
    assert discover(env) == DistEnv(3, 4, 1)
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == str(20000 + 12345 % 20000)
    # torchrun's variables win over SLURM's (srun torchrun ...)
    assert discover({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"}).world == 2
    assert _first_host("node1,node2") == "node1" and _first_host("a[1,3-4]") == "a1"
    with pytest.raises(RuntimeError, match="outside"):
        discover({"RANK": "2", "WORLD_SIZE": "2"})


def test_global_batch_is_sliced_over_ranks():
    """Two ranks' slices of batch and randomness concatenate to the one-rank batch (same global run)."""
    cfg = _cfg(1, ["model.gen_norm=none"])
    one = Trainer(cfg)
    halves = [Trainer(cfg, rank, 2) for rank in range(2)]
    x = one.stream.next_batch()
    assert torch.equal(torch.cat([h.stream.next_batch() for h in halves]), x)
    probs = [0.1, 0.2, 0.5, 0.2]
    ref = draw_step_batch(x, one.schedule, one.gen_enc.generator, one.terms, cfg.model.nz, one.rng, nce_std=2.0,
                          step_probs=probs)
    parts = [draw_step_batch(x[r * 16:(r + 1) * 16], h.schedule, h.gen_enc.generator, h.terms, cfg.model.nz,
                             h.rng, r, 2, nce_std=2.0, step_probs=probs) for r, h in enumerate(halves)]
    for field in ("k", "x_k", "x_k1", "z", "x_fake", "enc_noise", "nce_noise"):
        assert torch.allclose(torch.cat([getattr(p, field) for p in parts]), getattr(ref, field), atol=1e-6), field


def test_batch_that_does_not_divide_is_a_clear_error(tmp_path):
    env = ds_env() | {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}
    r = subprocess.run([sys.executable, "-m", "ddaebm", "train", str(CFG), "--run-dir", "r", "data.batch=32",
                        "dist.backend=deepspeed"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "data.batch=32" in r.stderr and "3 ranks" in r.stderr
    assert not (tmp_path / "r").exists()


def test_sampling_skips_a_corrupted_newest_checkpoint(tmp_path):
    """sample/density/eval restore by the same rule as resume."""
    from ddaebm.model import Model

    train(_cfg(8), tmp_path / "run")
    state = tmp_path / "run" / "checkpoints" / "step-000000008" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.warns(CheckpointWarning):
        assert Model.from_run(tmp_path / "run").step == 4
