import contextlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Tiny settings that keep a training run to a second or two.
TINY = ["model.hidden=32", "data.batch=32", "train.log_every=5", "train.ckpt_every=5", "train.snapshot_every=1000",
        "eval.num_samples=500", "eval.grid=40"]


@pytest.fixture
def cli_env():
    """The environment of a one-process CLI subprocess: this checkout first on the path, no launcher's variables
    (an earlier test may have left RANK/WORLD_SIZE in os.environ: distributed.discover fills them from SLURM's)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args, cwd, env):
    import subprocess

    return subprocess.run([sys.executable, "-m", "ddaebm", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST")


@contextlib.contextmanager
def one_process():
    """A context in which this process is no launcher's rank: the CLI called in process must see world size 1
    whatever an earlier test left in os.environ (distributed.discover fills RANK/WORLD_SIZE from SLURM's)."""
    with pytest.MonkeyPatch.context() as patch:
        for key in LAUNCHER_VARS:
            patch.delenv(key, raising=False)
        yield
