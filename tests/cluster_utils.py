"""Helpers for the cluster tests: a real local SLURM, LSUN-shaped shards, and waiting with deadlines.

The SLURM daemons come from `slurm/ci/local_slurm.sh` (it installs the Debian packages when missing); tests skip
with its reason where it cannot run (not root, no apt-get). Every wait here has a deadline, so nothing hangs.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.dist_utils import ds_env

LOCAL_SLURM = ROOT / "slurm" / "ci" / "local_slurm.sh"
EXIT_CANNOT_RUN = 3  # local_slurm.sh: not root / nothing to install with


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5):
    """predicate()'s first truthy value, polled until `timeout` seconds passed (then AssertionError naming `what`)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def lsun_like_shards(tmp: Path, count: int = 128) -> Path:
    """`count` smooth random 128² JPEGs written as lsun_church-train shards by `python -m data_shards folder`."""
    import numpy as np
    from PIL import Image

    images, out = tmp / "images", tmp / "shards"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:128, 0:128] / 128.0
    for i in range(count):
        a, b, c = rng.uniform(0, 6, 3)
        rgb = np.stack([np.sin(a * xx + b * yy + c), np.cos(b * xx - a * yy), np.sin(c * xx * yy + a)], -1)
        rgb = ((rgb + 1) * 127.5 + rng.normal(0, 8, rgb.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(images / f"{i:05d}.jpg", quality=90)
    r = subprocess.run([sys.executable, "-m", "data_shards", "folder", "--input", str(images), "--out", str(out),
                        "--name", "lsun_church", "--split", "train", "--shard-size", str(count // 2)],
                       cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


def slurm_env(conf: Path) -> dict:
    """The test environment for SLURM client commands and for the jobs (sbatch exports it into them)."""
    env = {k: v for k, v in ds_env().items() if not k.startswith("SLURM_")}  # in case pytest runs inside a job
    env["SLURM_CONF"] = str(conf)
    env["DDAEBM_PYTHON"] = sys.executable  # the interpreter running the tests, whatever venv it lives in
    return env


@contextlib.contextmanager
def local_slurm(folder: Path):
    """A running single-node SLURM whose state lives in `folder`; yields the client environment."""
    r = subprocess.run(["bash", str(LOCAL_SLURM), "start", str(folder)], capture_output=True, text=True, timeout=600)
    if r.returncode == EXIT_CANNOT_RUN:
        pytest.skip(f"no local SLURM: {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        yield slurm_env(folder / "slurm.conf")
    finally:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop", str(folder)], capture_output=True, text=True, timeout=120)


def job_fields(job: str, env: dict) -> dict[str, str]:
    """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, ...); {} once the job is forgotten."""
    r = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return {}
    fields = {}
    for item in r.stdout.split():
        key, sep, value = item.partition("=")
        if sep:
            fields[key] = value
    return fields


def sbatch(args: list[str], env: dict, cwd: Path = ROOT, submit: bool = False) -> str:
    """The job id of `sbatch --parsable ARGS`, or of `slurm/submit.sh --parsable ARGS` (its pre-flight first)."""
    cmd = ["bash", str(ROOT / "slurm" / "submit.sh")] if submit else ["sbatch"]
    r = subprocess.run([*cmd, "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]
