"""`sbatch slurm/lsun_church.sh` on a real single-node SLURM (munged, slurmctld, slurmd started here).

The job trains tiny LSUN-shaped networks on 128² shards on 2 DeepSpeed ranks (2 SLURM tasks), gets the
preemption warning SIGUSR1 in its batch shell (`scancel --signal=USR1 --batch`, what `--signal=B:USR1@300`
sends before the time limit), checkpoints, requeues itself and resumes from its checkpoint to the end. The test
cluster shortens SLURM's requeue hold (cred_expire + 1 s, 121 s by default) to 11 s; see slurm/ci/local_slurm.sh.
Figures (sbatch → first step, signal → checkpointed exit → restart → first resumed step) are printed (pytest -s).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.cluster_utils import job_fields, local_slurm, lsun_like_shards, sbatch, wait_until
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("apt-get") is None and shutil.which("sbatch") is None,
                                reason="neither SLURM nor apt-get to install it")
pytest.importorskip("deepspeed")

STEPS = 10
# configs/tiny/lsun_church128.yaml made smaller still: the run stays 128², DDPM++-shaped, with fewer channels.
TINY = [f"train.steps={STEPS}", "train.ckpt_every=3", "train.log_every=1", "train.snapshot_every=100000",
        "model.nf=4", "model.encoder_ngf=4", "model.attn_resolutions=[]"]


def readme_small_machine() -> tuple[dict, list[str], str, list[str]]:
    """slurm/README.md's command for CPU-only nodes and small machines, as the test runs it: (environment,
    submit.sh's sbatch flags, the job script, its ddaebm arguments without data.root)."""
    text = (ROOT / "slurm" / "README.md").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("DDAEBM_CONFIG=configs/tiny/lsun_church128"))
    words = shlex.split(line.split("#")[0])
    env = dict(w.split("=", 1) for w in words[:words.index("slurm/submit.sh")])
    rest = words[words.index("slurm/submit.sh") + 1:]
    script = next(w for w in rest if w.endswith(".sh"))
    flags, args = rest[:rest.index(script)], rest[rest.index(script) + 1:]
    return env, flags, script, [a for a in args if not a.startswith("data.root=")]
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with local_slurm(tmp_path_factory.mktemp("slurm")) as env:
        yield env


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "stats.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _stamp(log: str, pattern: str) -> float:
    """The time of the launcher's first log line matching `pattern` (its lines start with [ISO time])."""
    m = re.search(r"^\[([^\]]+)\] slurm/launch\.sh: " + pattern, log, re.M)
    assert m, f"no launcher line matching {pattern!r} in the job log:\n{log[-3000:]}"
    return datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()


def _ranks_of(run_dir: Path) -> list[int]:
    """The pids of the `ddaebm train` processes training in `run_dir` (the job's ranks, on this one node)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        python = Path(args[0].decode(errors="replace")).name.startswith("python")  # not srun, which names them too
        if python and b"ddaebm" in args and b"train" in args and str(run_dir).encode() in args:
            pids.append(int(cmdline.parent.name))
    return pids


def _finished(job: str, env: dict, log: Path):
    fields = job_fields(job, env)
    state = fields.get("JobState", "")
    if state in DONE:
        return fields
    if state == "PENDING" and fields.get("Reason") not in (None, "None", "BeginTime", "Priority", "Resources"):
        raise AssertionError(f"job {job} held: {fields.get('Reason')}\n{log.read_text()[-3000:]}")
    return None


def test_sbatch_lsun_church_preempted_requeued_resumed(slurm, tmp_path):
    """slurm/README.md's command for small machines (tiny config, 2 CPU tasks, no GPU), through submit.sh's
    pre-flight, preempted, requeued and resumed to the end."""
    shards = lsun_like_shards(tmp_path)
    readme_env, flags, script, args = readme_small_machine()
    assert script == "slurm/lsun_church.sh" and "--gpus-per-node=0" in flags, (flags, script)
    env = dict(slurm, **readme_env, DDAEBM_RUN_ROOT=str(tmp_path / "runs"))
    run_dir, log = tmp_path / "runs" / "ci_church", tmp_path / "ci_church.out"

    t_submit = time.time()
    job = sbatch([*flags, "-J", "ci_church", f"--output={log}", script, f"data.root={shards}", *args, *TINY], env,
                 submit=True)
    wait_until(lambda: _rows(run_dir) or _finished(job, env, log), 300, "the first training step")
    t_first_step = time.time()
    assert _rows(run_dir), f"job ended before training:\n{log.read_text()[-3000:]}"
    wait_until(lambda: len(_rows(run_dir)) >= 2 or _finished(job, env, log), 120, "a second step")

    # The preemption warning, as --signal=B:USR1@300 delivers it: to the batch shell only.
    t_signal = time.time()
    r = subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    seen = {}

    def resumed_or_done():  # notes when the requeued run has written its first step
        steps = [row["step"] for row in _rows(run_dir)]
        if "stopped" not in seen and "exit status 143" in log.read_text():
            seen["stopped"] = max(steps)
        if "stopped" in seen and "resumed" not in seen and max(steps) > seen["stopped"]:
            seen["resumed"] = time.time()
        return _finished(job, env, log)

    fields = wait_until(resumed_or_done, 420, "the requeued job to finish", poll=0.2)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, text[-4000:])
    assert fields["Restarts"] == "1", (fields, text[-4000:])

    # The first run checkpointed at the step it was in, exited 143, and the job requeued itself ...
    m = re.search(r"preempted \(SIGUSR1\): stopped at step (\d+) with a checkpoint", text)
    assert m, text[-4000:]
    stopped = int(m.group(1))
    assert 2 <= stopped < STEPS
    assert "ranks ended with exit status 143 after SIGUSR1" in text
    assert "restart 1:" in text and "requeuing job" in text
    # ... and the requeued run resumed from that checkpoint in the same run dir, on 2 ranks, to the end.
    assert f"resumed at step {stopped}/{STEPS} in {run_dir} on 2 ranks" in text
    assert text.rstrip().splitlines()[-1].endswith("ranks ended with exit status 0")
    assert [row["step"] for row in _rows(run_dir)] == list(range(1, STEPS + 1))  # every step once
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS:09d}"
    assert (run_dir / f"slurm-{job}.out").resolve() == log.resolve()

    # Figures for the report (launcher timestamps are wall-clock, like time.time()).
    t_exit = _stamp(text, "ranks ended with exit status 143")
    t_restart = _stamp(text, r"job \d+ 'ci_church' restart 1")
    figures = {"sbatch_to_first_step_s": t_first_step - t_submit,
               "signal_to_checkpointed_exit_s": t_exit - t_signal,
               "exit_to_requeued_start_s": t_restart - t_exit,
               "requeued_start_to_first_resumed_step_s": seen.get("resumed", float("nan")) - t_restart,
               "total_job_s": time.time() - t_submit}
    print("\nSLURM figures:", json.dumps({k: round(v, 1) for k, v in figures.items()}))

def test_bad_input_fails_without_requeue(slurm, tmp_path):
    """Exit status 2 (an unknown key) ends the job as FAILED 2:0 and is never requeued."""
    env = dict(slurm, DDAEBM_RUN_ROOT=str(tmp_path / "runs"))
    log = tmp_path / "bad.out"
    job = sbatch([*readme_small_machine()[1], "-J", "ci_bad", f"--output={log}", "slurm/cifar10.sh",
                  "loss.no_such_key=1"], env)
    fields = wait_until(lambda: _finished(job, env, log), 180, "the job to fail")
    text = log.read_text()
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0", (fields, text[-3000:])
    assert fields["Restarts"] == "0" and "no_such_key" in text and "requeuing" not in text


@pytest.mark.parametrize("flags, reason", [
    ([], "gres"),  # the header verbatim: 4 GPUs per node, on a node without any
    (["--gpus-per-node=0"], "node configuration is not available"),  # 4 tasks x 8 CPUs on a 2-CPU node
])
def test_submit_refuses_what_this_cluster_cannot_run(slurm, tmp_path, flags, reason):
    """slurm/submit.sh's pre-flight (`sbatch --test-only`): a request no node here can hold fails at once, in one
    line naming SLURM's reason and the nodes there are, exit 2, nothing queued; plain sbatch would refuse the
    first with a terse gres error and leave the second PENDING for ever."""
    env = dict(slurm, DDAEBM_RUN_ROOT=str(tmp_path / "runs"))
    queued = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True).stdout.split()
    t0 = time.time()
    r = subprocess.run(["bash", "slurm/submit.sh", *flags, "-J", "ci_refused", "slurm/lsun_church.sh",
                        "data.root=/nowhere"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r
    assert reason in r.stderr and "Nodes here: 1 node(s) of" in r.stderr and "--gpus-per-node=0" in r.stderr, r.stderr
    assert time.time() - t0 < 30
    now = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True).stdout.split()
    assert now == queued and not (tmp_path / "runs").exists()


def test_kill_9_between_checkpoints_then_resubmit_logs_every_step_once(slurm, tmp_path):
    """kill -9 of the job's ranks past the step-200 checkpoint, with rows of later steps in stats.jsonl: srun ends
    137, the job fails and is not requeued; the same sbatch again resumes from step 200 and stats.jsonl ends with
    one row per logged step (ddaebm's Monitor drops the rows past the step a run resumes from). Toy data through
    slurm/cifar10.sh (DDAEBM_CONFIG), 2 DeepSpeed ranks."""
    env = dict(slurm, DDAEBM_CONFIG="configs/toy/25gaussians.yaml", DDAEBM_RUN_ROOT=str(tmp_path / "runs"))
    run_dir = tmp_path / "runs" / "ci_k9"
    args = [*readme_small_machine()[1], "-J", "ci_k9", f"--output={tmp_path / 'k9.out'}", "slurm/cifar10.sh",
            "dist.backend=deepspeed", "train.steps=600", "train.log_every=20", "train.ckpt_every=200",
            "model.hidden=32", "model.gen_norm=none", "data.batch=32", "train.snapshot_every=100000",
            "train.eval_at_end=false"]
    log = tmp_path / "k9.out"
    job = sbatch(args, env)
    wait_until(lambda: any(r["step"] > 200 for r in _rows(run_dir)) or _finished(job, env, log), 300,
               "a row past step 200")
    ranks = _ranks_of(run_dir)
    assert len(ranks) == 2, ranks
    for pid in ranks:  # kill -9, both ranks at once: no signal handler, no checkpoint
        os.kill(pid, signal.SIGKILL)
    fields = wait_until(lambda: _finished(job, env, log), 120, "the killed job to end")
    assert fields["JobState"] != "COMPLETED" and fields["Restarts"] == "0", (fields, log.read_text()[-3000:])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000000200"
    assert max(r["step"] for r in _rows(run_dir)) > 200  # rows the next job must not repeat

    job = sbatch(args, env)
    fields = wait_until(lambda: _finished(job, env, log), 300, "the resubmitted job to finish")
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED", (fields, text[-3000:])
    assert f"resumed at step 200/600 in {run_dir} on 2 ranks" in text
    assert [r["step"] for r in _rows(run_dir)] == list(range(20, 601, 20))

