"""cluster/sweep.py and cluster/train.py on a real local Ray (2 CPUs), and `ray up`/`ray submit`/`ray down` against
this machine over ssh (cluster/ci/ray_up_local.sh, isolated in its own namespaces).

Every run is a subprocess in its own session with a deadline; on a timeout the whole process group is killed (the
Ray processes a driver starts with `ray.init` share its fate). No test calls `ray stop`, which would also stop
other Ray instances on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster_utils import wait_until
from tests.conftest import CONFIGS, ROOT
from tests.dist_utils import ds_env

pytest.importorskip("ray")
SWEEP, TRAIN = ROOT / "cluster" / "sweep.py", ROOT / "cluster" / "train.py"
TOY = str(CONFIGS / "toy" / "25gaussians.yaml")
# Tiny toy runs: 32-unit networks, small evaluations, no intermediate plots.
TOY_TINY = ["model.hidden=32", "train.snapshot_every=100000", "eval.num_samples=500", "eval.grid=40",
            "train.log_every=50"]
DS_TINY = ["model.hidden=32", "model.gen_norm=none", "data.batch=32", "dist.backend=deepspeed", "train.log_every=10",
           "train.ckpt_every=20", "train.snapshot_every=100000", "eval.num_samples=500", "eval.grid=40"]


def _env(**extra) -> dict:
    env = ds_env()
    env.pop("RAY_ADDRESS", None)
    return env | extra


def _start(args: list, cwd: Path = ROOT, **env) -> subprocess.Popen:
    """A driver in its own session (its sid is its pid, and every process it starts, Ray's included, keeps it)."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _run(args: list, timeout: float, cwd: Path = ROOT, **env) -> subprocess.CompletedProcess:
    """A driver run to its end, killed with everything it started when it overruns `timeout`; and checked to
    leave no process of its own behind (Ray's included)."""
    with _start(args, cwd, **env) as p:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
            raise AssertionError(f"{args[0]} overran {timeout} s:\n{out[-4000:]}") from None
    _no_processes_left(p.pid, out)
    return subprocess.CompletedProcess(args, p.returncode, out, "")


def _session(sid: int) -> list[str]:
    """The processes still running in session `sid` (a driver's, see _start): pid and name."""
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state, ppid, pgrp, session
            left.append(f"{stat.parent.name} {name}")
    return left


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` at once, as a node failure would."""
    for entry in _session(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(entry.split()[0]), signal.SIGKILL)


def _no_processes_left(sid: int, out: str, within: float = 15) -> None:
    """Nothing the driver started outlives it by more than `within` seconds (Ray's workers end a moment after
    their raylet); what does is killed, and the test fails naming it."""
    try:
        wait_until(lambda: not _session(sid), within, "the driver's processes to end", poll=0.2)
    except AssertionError:
        left = _session(sid)
        _kill_session(sid)
        raise AssertionError(f"processes of the driver left behind: {left}\n{out[-3000:]}") from None


def _ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stdout[-5000:]


def _summary(storage: Path, name: str) -> dict:
    return json.loads((storage / name / "summary.json").read_text())


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def _sweep_args(storage: Path, name: str, *extra: str) -> list:
    # One trial at a time: the order in which trials reach ASHA's rungs, hence what it stops, is then fixed.
    return [SWEEP, "--local", "--num-cpus", "2", TOY, "--storage", storage, "--name", name, "--max-concurrent", "1",
            "--samples", "1", "--eval-num", "1000", *extra, *TOY_TINY]


def test_sweep_asha_crash_restore_best_yaml(tmp_path):
    """4 trials over γ: ASHA stops some early, a trial SIGKILLed mid-run restarts from its last checkpoint
    (FailureConfig), and the best config comes out as a YAML that `ddaebm train` reads."""
    from ddaebm.config import load_config

    t0 = time.time()
    r = _run(_sweep_args(tmp_path, "ci", "--steps", "300", "--report-every", "50", "--grace", "1",
                         "--param", "loss.r1_gamma=grid:0.0002,0.002,0.02,0.2", "--crash-once-at", "150"), 600)
    wall = time.time() - t0
    _ok(r)
    s = _summary(tmp_path, "ci")
    trials = {t["trial_id"]: t for t in s["trials"]}
    assert len(trials) == 4 and all(t["error"] is None for t in trials.values()), s
    assert any(t["early_stopped"] for t in trials.values()), s  # ASHA (grace 1 slice, factor 2)
    assert any(t["step"] == 300 for t in trials.values()), s
    # The killed trial came back from its step-100 report (it died at 150, before reporting) and finished.
    crashed = [t for t in trials.values() if t["resumed_from"]]
    assert len(crashed) == 1 and crashed[0]["resumed_from"] == 100 and crashed[0]["step"] == 300, s
    assert "--crash-once-at 150: killing this trial process" in r.stdout
    run_dir = tmp_path / "ci" / "runs" / crashed[0]["trial_id"]
    assert _steps(run_dir) == list(range(50, 301, 50))  # rewound to step 100 on restore: no step logged twice
    assert (run_dir / "metric-toy.jsonl").is_file()  # the end-of-trial `eval toy`

    best = tmp_path / "ci" / "best.yaml"
    cfg = load_config(best)
    best_trial = trials[s["best"]]
    assert cfg.loss.r1_gamma == pytest.approx(best_trial["config"]["loss.r1_gamma"])
    assert best_trial["mmd2"] == min(t["mmd2"] for t in trials.values() if t["step"] == 300)
    assert cfg.model.hidden == 32 and cfg.train.steps == 20000  # fixed overrides kept, the sweep budget not
    print(f"\nRay sweep figures: 4 trials, wall {wall:.1f} s (Tune {s['wall_s']} s), early-stopped "
          f"{sum(t['early_stopped'] for t in trials.values())}, best {s['best']} mmd2 {best_trial['mmd2']:.4g}")


def test_two_worker_sweep_finishes_with_a_killed_rank(tmp_path):
    """Issue 22's reproduction: 3 trials of 2 DeepSpeed ranks, one at a time, on a private Ray of 5 CPUs (it hung
    after the first trials: each stopped one kept its workers' CPUs). A rank of the first trial is SIGKILLed at
    step 100, before its report; the trial restarts from its step-50 checkpoint and finishes. Every trial ends,
    and the driver leaves no process behind."""
    from ddaebm.config import load_config

    t0 = time.time()
    r = _run([SWEEP, "--local", TOY, "--name", "W3", "--storage", tmp_path, "--samples", "1", "--steps", "100",
              "--report-every", "50", "--workers", "2", "--num-cpus", "5", "--max-concurrent", "1",
              "--param", "loss.r1_gamma=grid:0.002,0.02,0.2", "--eval-num", "500", "--crash-once-at", "100",
              "model.hidden=32", "train.log_every=10"], 420)
    wall = time.time() - t0
    _ok(r)
    s = _summary(tmp_path, "W3")
    trials = s["trials"]
    assert len(trials) == 3 and all(t["error"] is None for t in trials), s
    assert "--crash-once-at 100: killing this trial process" in r.stdout
    assert "failed during a training slice" in r.stdout  # the trial's reason, then Tune's restart
    (crashed,) = [t for t in trials if t["resumed_from"]]
    assert crashed["resumed_from"] == 50 and crashed["step"] == 100, s
    run_dir = tmp_path / "W3" / "runs" / crashed["trial_id"]
    assert "on 2 ranks" in r.stdout and (run_dir / "checkpoints" / "step-000000100" / "engines" / "energy").is_dir()
    assert _steps(run_dir) == list(range(10, 101, 10))  # rows 60-100 of the killed attempt dropped on restore
    cfg = load_config(tmp_path / "W3" / "best.yaml")
    assert cfg.dist.backend == "deepspeed"
    print(f"\n2-worker sweep (3 trials, one rank killed): wall {wall:.1f} s (Tune {s['wall_s']} s)")


def test_a_trial_that_cannot_start_fails_with_its_reason_and_the_sweep_goes_on(tmp_path):
    """A 2-rank trial whose values do not fit (data.batch=33 over 2 ranks) fails at its start with the launch
    check's reason, once more on Tune's retry (--max-failures 1: 2 attempts), and is reported as failed; the other
    trial finishes and the sweep ends with its best config (exit 0)."""
    r = _run([SWEEP, "--local", "--num-cpus", "3", TOY, "--storage", tmp_path, "--name", "bad", "--workers", "2",
              "--samples", "1", "--steps", "20", "--report-every", "20", "--eval-num", "500",
              "--param", "data.batch=grid:32,33", *DS_TINY], 420)
    _ok(r)
    s = _summary(tmp_path, "bad")
    good, bad = sorted(s["trials"], key=lambda t: t["config"]["data.batch"])
    assert good["error"] is None and good["step"] == 20 and s["best"] == good["trial_id"], s
    assert bad["error"] and "data.batch=33" in bad["error"] and "must divide over the 2 ranks" in bad["error"], s
    reason = r"rank \d of 2 failed during rendezvous and restore: ConfigError: data\.batch=33 is the global batch"
    assert len(re.findall(reason, r.stdout)) >= 2, r.stdout[-3000:]  # both attempts, with the reason
    assert f"failed: {bad['trial_id']} after 2 attempt(s) (--max-failures 1): " in r.stdout, r.stdout[-3000:]


def test_interrupted_sweep_resumes_with_tuner_restore(tmp_path):
    """SIGTERM to a 2-worker sweep mid-trial: Tune saves its state and the driver leaves with 130 within GRACE_S,
    no process of its own behind; the same command again resumes it (Tuner.restore) to the end. Run from tmp_path
    without --storage: the sweep lives in ./runs/sweeps there, never in a checkout."""
    args = [SWEEP, "--local", "--num-cpus", "3", TOY, "--name", "int", "--workers", "2", "--samples", "1",
            "--steps", "200", "--report-every", "50", "--eval-num", "500", "--param", "loss.r1_gamma=grid:0.002,0.02",
            *TOY_TINY]
    exp = tmp_path / "runs" / "sweeps" / "int"
    p = _start(args, tmp_path)
    try:
        # A checkpoint's folder appears when the trial persists it, before Tune's driver registers it: a signal
        # right then restored the trial from the one before (once in CI). Wait for the third report's (step 150):
        # the step-100 one is registered by then, and the trial is still a report from its end.
        wait_until(lambda: p.poll() is not None or list(exp.glob("run_trial_*/checkpoint_000002")), 300,
                   "a trial's step-150 checkpoint", poll=0.2)
        assert p.poll() is None, "the sweep ended before it could be interrupted"
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=90)
        stop_s = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert p.returncode == 130 and "run the same command again to resume" in out, out[-4000:]
    assert stop_s < 60, f"the sweep took {stop_s:.1f} s to stop (GRACE_S is 60)"
    _no_processes_left(p.pid, out)
    assert "search space:" in out and f"storage: {exp}" in out  # said before it starts

    r = _run(args, 600, tmp_path)
    _ok(r)
    assert "resuming the sweep" in r.stdout
    s = json.loads((exp / "summary.json").read_text())
    assert s["resumed"] and len(s["trials"]) == 2 and all(t["error"] is None for t in s["trials"]), s
    first = next(t for t in s["trials"] if t["config"]["loss.r1_gamma"] == 0.002)
    assert first["resumed_from"] >= 100 and first["step"] == 200, s  # continued from its checkpoint
    assert _steps(exp / "runs" / first["trial_id"]) == [50, 100, 150, 200]
    print(f"\nSIGTERM to a 2-worker sweep: exit 130 after {stop_s:.1f} s")


def test_train_py_continues_a_cli_run_and_survives_a_killed_worker(tmp_path):
    """One run dir, three schedulers: torchrun starts it, cluster/train.py (Ray Train, 2 DeepSpeed workers, one
    SIGKILLed after step 40) continues it, and the plain CLI on 1 process finishes it."""
    run_dir = tmp_path / "runs" / "toyrun"
    cli = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "ddaebm",
           "train", TOY, "--run-dir", str(run_dir), "--steps", "60", "--slice-steps", "20", *DS_TINY]
    r = subprocess.run(cli, cwd=ROOT, env=_env() | {"TMPDIR": str(tmp_path)}, capture_output=True, text=True,
                       timeout=300)  # TMPDIR: torchrun's torchelastic_* folder goes with the test's
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    t0 = time.time()
    r = _run([TRAIN, "--local", "--num-cpus", "2", TOY, "--name", "toyrun", "--workers", "2", "--steps", "60",
              "--crash-once-at", "40", *DS_TINY], 600, DDAEBM_RUN_ROOT=str(tmp_path / "runs"))
    _ok(r)
    assert "resuming from step 20" in r.stdout and "resumed at step 20/60" in r.stdout
    assert "--crash-once-at: killing rank" in r.stdout and "resumed at step 40/60" in r.stdout  # Ray's restart
    assert _steps(run_dir) == [10, 20, 30, 40, 50, 60]
    assert (run_dir / "ray").is_dir()  # Ray Train's own files stay inside the run dir
    ray_s = time.time() - t0

    r = subprocess.run([sys.executable, "-m", "ddaebm", "train", TOY, "--run-dir", str(run_dir), "--steps", "70",
                        *DS_TINY], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed at step 60/70" in r.stdout and _steps(run_dir)[-1] == 70
    print(f"\ncluster/train.py: 2 workers, 40 steps with one worker killed and restarted: {ray_s:.1f} s")


def test_train_py_logs_every_step_once_after_a_kill_9_between_checkpoints(tmp_path):
    """cluster/train.py (2 Ray Train workers) SIGKILLed with all its processes past its step-100 checkpoint, with
    rows of later steps in stats.jsonl; the same command again resumes from step 100, and stats.jsonl ends with one
    row per logged step (ddaebm's Monitor drops the rows past the step a run resumes from)."""
    run_root = tmp_path / "runs"
    run_dir = run_root / "k9"
    args = [TRAIN, "--local", "--num-cpus", "2", TOY, "--name", "k9", "--workers", "2", "--steps", "200",
            *DS_TINY, "train.log_every=5", "train.ckpt_every=100"]

    def logged() -> list[int]:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            return _steps(run_dir)
        return []

    p = _start(args, DDAEBM_RUN_ROOT=str(run_root))
    try:
        wait_until(lambda: p.poll() is not None or any(step > 100 for step in logged()), 300, "a row past step 100",
                   poll=0.05)
        assert p.poll() is None, "the run ended before it could be killed"
    finally:
        _kill_session(p.pid)  # the driver, its local Ray and the workers (each in a process group of its own)
        out, _ = p.communicate()
    _no_processes_left(p.pid, out)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000000100"
    assert max(logged()) > 100, logged()  # rows the next run must not repeat

    r = _run(args, 300, DDAEBM_RUN_ROOT=str(run_root))
    _ok(r)
    assert "resuming from step 100" in r.stdout
    assert _steps(run_dir) == list(range(5, 201, 5))


def _space_module():
    """cluster/sweep_space.py, the sweep's search-space parsing (pure: no Ray, no ray_common)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddaebm_sweep_space_under_test", SWEEP.parent / "sweep_space.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_param_values_may_be_lists():
    """--param splits its values at the commas outside brackets: a list-valued key (per-step γ) can be swept, and
    the trial's override reads back as that list."""
    from ddaebm.errors import BadInput

    space_of = _space_module()
    space = space_of.read_space(None, ["loss.r1_gamma_scale=grid:[20,5,1,1],[1,1,1,1]",
                                       "loss.r1_gamma=loguniform:1e-4,1e-1", "diffusion.grid=choice:eps,drl"], None)
    assert space == {"loss.r1_gamma_scale": ["grid", [20, 5, 1, 1], [1, 1, 1, 1]],
                     "loss.r1_gamma": ["loguniform", 1e-4, 1e-1], "diffusion.grid": ["choice", "eps", "drl"]}
    from ddaebm.config import load_config

    cfg = load_config(TOY, space_of.param_overrides({"loss.r1_gamma_scale": [20, 5, 1, 1]}))
    assert list(cfg.loss.r1_gamma_scale) == [20.0, 5.0, 1.0, 1.0]
    for bad, why in (("loss.r1_gamma_scale=grid:[20,5,1,1", "unbalanced"), ("loss.r1_gamma=grid:0.1,,0.2", "empty"),
                     ("loss.r1_gamma=grid:0.1]", "unbalanced")):
        with pytest.raises(BadInput, match=why):
            space_of.read_space(None, [bad], None)
    # --space reads numbers as the overrides do (plain YAML would leave 1e-4 a string)
    assert space_of.read_space("{loss.r1_gamma: [loguniform, 1e-4, 1e-1]}", [], None) == {
        "loss.r1_gamma": ["loguniform", 1e-4, 1e-1]}
    with pytest.raises(BadInput, match="--space: cannot read"):
        space_of.read_space("{loss.r1_gamma: [grid, 1e-4", [], None)


@pytest.mark.parametrize("kind, overrides, keys", [
    ("explicit", [], ["diffusion.variances"]),  # 25gaussians' own schedule
    ("vp", ["diffusion.variances=null", "diffusion.beta_min=0.1", "diffusion.beta_max=20.0"],
     ["diffusion.beta_min", "diffusion.beta_max"]),
    ("geometric", ["diffusion.variances=null", "diffusion.beta_min=1e-4", "diffusion.beta_max=0.9999"],
     ["diffusion.beta_min", "diffusion.beta_max"]),
])
def test_default_space_sweeps_the_schedule_of_every_variance_kind(kind, overrides, keys, tmp_path):
    """The default space has the β schedule for each diffusion.variance, every value it can draw is a config
    that builds a schedule, and `sweep.py --dry-run` prints the space before anything starts."""
    from ddaebm.config import load_config
    from ddaebm.diffusion.schedule import build_schedule

    space_of = _space_module()
    overrides = [f"diffusion.variance={kind}", *overrides]
    space = space_of.default_space(load_config(TOY, overrides))
    assert all(k in space for k in keys), space
    for key in keys:
        kind_, *values = space[key]
        for value in values:  # a range's two ends, or every choice
            cfg = load_config(TOY, [*overrides, *space_of.param_overrides({key: value})])
            build_schedule(cfg.diffusion)
    if kind == "explicit":
        lists = space["diffusion.variances"][1:]
        assert len(lists) >= 3 and load_config(TOY).diffusion.variances in lists  # CONFIG's own list among them
    r = _run([SWEEP, "--local", TOY, "--storage", tmp_path, "--dry-run", *overrides], 120)
    _ok(r)
    assert "search space:" in r.stdout and all(k in r.stdout for k in keys), r.stdout
    assert not (tmp_path / f"sweep-{load_config(TOY).name}").exists()  # nothing started, nothing written


def test_bad_input_fails_before_ray_starts(tmp_path):
    r = _run([SWEEP, "--local", TOY, "--storage", tmp_path, "loss.no_such_key=1"], 120)
    assert r.returncode == 2 and "no_such_key" in r.stdout, r.stdout[-2000:]
    r = _run([TRAIN, "--local", TOY, "--workers", "2", "--run-dir", tmp_path / "r", "model.hidden=32"], 120)
    assert r.returncode == 2 and "dist.backend=deepspeed" in r.stdout, r.stdout[-2000:]
    assert not (tmp_path / "r").exists()


def test_ray_up_submit_down_on_this_machine(tmp_path):
    """The cluster launcher for real: sshd on 127.0.0.1, `ray up cluster/cluster.yaml` (local provider), `ray
    submit ... cluster/sweep.py`, `ray down` (cluster/ci/ray_up_local.sh; its own PID/net/mount namespaces). A
    second sweep, 2 ranks per trial, is submitted without a terminal and its `ray submit` gets SIGINT (as Ctrl-C
    where there is no terminal: "Aborted!", and the ssh session closes): the remote sweep gets SIGHUP from its
    closed pty, stops gracefully with its output in driver.log, and the same `ray submit` resumes it to the end."""
    if os.geteuid() != 0:
        pytest.skip("needs root (sshd, namespaces)")
    t0 = time.time()
    cmd = ["bash", str(ROOT / "cluster" / "ci" / "ray_up_local.sh"), str(tmp_path), "configs/toy/25gaussians.yaml",
           "--name", "up", "--samples", "1", "--steps", "100", "--report-every", "50", "--max-concurrent", "1",
           "--param", "loss.r1_gamma=grid:0.002,0.02", "--eval-num", "500", *TOY_TINY]
    with subprocess.Popen(cmd, cwd=ROOT, env=_env(DDAEBM_PYTHON=sys.executable, RAY_UP_INTERRUPT="upint"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True) as p:
        try:
            out, _ = p.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the namespace's init dies, and everything inside with it
            out, _ = p.communicate()
            raise AssertionError(f"ray_up_local.sh overran 900 s:\n{out[-4000:]}") from None
    if p.returncode == 3:
        pytest.skip(f"cannot run ray up here: {out.strip()[-300:]}")
    assert p.returncode == 0, out[-6000:]
    sweeps = tmp_path / "runs" / "sweeps"
    s = _summary(sweeps, "up")
    assert len(s["trials"]) == 2 and all(t["error"] is None for t in s["trials"]), s
    assert (sweeps / "up" / "best.yaml").is_file()
    # The interrupted one: SIGHUP on the head node, a graceful stop, then resumed by the same command.
    assert "Aborted!" in out and "[the remote sweep ended" in out, out[-6000:]
    log = (sweeps / "upint" / "driver.log").read_text()
    assert "SIGHUP: stopping the sweep as on SIGINT" in log and "sweep: interrupted" in log, log[-3000:]
    s = _summary(sweeps, "upint")
    assert s["resumed"] and len(s["trials"]) == 2 and all(t["error"] is None and t["step"] for t in s["trials"]), s
    assert any(t["resumed_from"] for t in s["trials"]), s
    assert "No nodes remaining" in out  # ray down
    print(f"\nray up + ray submit (2-trial sweep) + an interrupted and resumed 2-rank sweep + ray down: "
          f"{time.time() - t0:.1f} s")


def _free_port() -> int:
    from ddaebm.distributed import free_port

    return free_port()
