"""cluster/sweep.py and cluster/train.py on a real local Ray (2 CPUs), and `ray up`/`ray submit`/`ray down` against
this machine over ssh (cluster/ci/ray_up_local.sh, isolated in its own namespaces).

Every run is a subprocess in its own session with a deadline; on a timeout the whole process group is killed (the
Ray processes a driver starts with `ray.init` share its fate). No test calls `ray stop`, which would also stop
other Ray instances on the machine.
"""

from __future__ import annotations

import json
import os
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


def _run(args: list[str], timeout: float, **env) -> subprocess.CompletedProcess:
    """A driver in its own process group, killed with everything it started when it overruns `timeout`."""
    with subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as p:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
            raise AssertionError(f"{args[0]} overran {timeout} s:\n{out[-4000:]}") from None
    return subprocess.CompletedProcess(args, p.returncode, out, "")


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


def test_interrupted_sweep_resumes_with_tuner_restore(tmp_path):
    """SIGINT mid-sweep: Tune saves its state (exit 130); the same command again resumes it (Tuner.restore)."""
    args = _sweep_args(tmp_path, "int", "--steps", "300", "--report-every", "50",
                       "--param", "loss.r1_gamma=grid:0.002,0.02")
    p = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        # A checkpoint's folder appears when the trial persists it, before Tune's driver registers it: a SIGINT
        # right then restored the trial from the one before (once in CI). Wait for the third report's (step 150):
        # the step-100 one is registered by then, and the trial is still three reports from its end.
        exp = tmp_path / "int"
        wait_until(lambda: p.poll() is not None or list(exp.glob("run_trial_*/checkpoint_000002")), 300,
                   "a trial's step-150 checkpoint", poll=0.2)
        assert p.poll() is None, "the sweep ended before it could be interrupted"
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert p.returncode == 130 and "run the same command again to resume" in out, out[-4000:]

    r = _run(args, 600)
    _ok(r)
    assert "resuming the sweep" in r.stdout
    s = _summary(tmp_path, "int")
    assert s["resumed"] and len(s["trials"]) == 2 and all(t["error"] is None for t in s["trials"]), s
    first = next(t for t in s["trials"] if t["config"]["loss.r1_gamma"] == 0.002)
    assert first["resumed_from"] >= 100 and first["step"] == 300, s  # continued from its checkpoint
    assert _steps(tmp_path / "int" / "runs" / first["trial_id"]) == [50, 100, 150, 200, 250, 300]


def test_sweep_trials_on_deepspeed_workers(tmp_path):
    """--workers 2: each trial is a Ray Train TorchTrainer run on 2 workers with dist.backend=deepspeed."""
    from ddaebm.config import load_config

    r = _run([SWEEP, "--local", "--num-cpus", "3", TOY, "--storage", tmp_path, "--name", "ds", "--workers", "2",
              "--samples", "1", "--steps", "40", "--report-every", "20", "--eval-num", "500",
              "--param", "loss.iw_alpha=grid:0.6",
              *DS_TINY], 600)
    _ok(r)
    s = _summary(tmp_path, "ds")
    (trial,) = s["trials"]
    assert trial["error"] is None and trial["step"] == 40 and not trial["early_stopped"], s
    run_dir = tmp_path / "ds" / "runs" / trial["trial_id"]
    assert "on 2 ranks" in r.stdout and (run_dir / "checkpoints" / "step-000000040" / "engines" / "energy").is_dir()
    cfg = load_config(tmp_path / "ds" / "best.yaml")
    assert cfg.dist.backend == "deepspeed" and cfg.loss.iw_alpha == pytest.approx(0.6)


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


def test_bad_input_fails_before_ray_starts(tmp_path):
    r = _run([SWEEP, "--local", TOY, "--storage", tmp_path, "loss.no_such_key=1"], 120)
    assert r.returncode == 2 and "no_such_key" in r.stdout, r.stdout[-2000:]
    r = _run([TRAIN, "--local", TOY, "--workers", "2", "--run-dir", tmp_path / "r", "model.hidden=32"], 120)
    assert r.returncode == 2 and "dist.backend=deepspeed" in r.stdout, r.stdout[-2000:]
    assert not (tmp_path / "r").exists()


def test_ray_up_submit_down_on_this_machine(tmp_path):
    """The cluster launcher for real: sshd on 127.0.0.1, `ray up cluster/cluster.yaml` (local provider), `ray
    submit ... cluster/sweep.py`, `ray down` (cluster/ci/ray_up_local.sh; its own PID/net/mount namespaces)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (sshd, namespaces)")
    t0 = time.time()
    cmd = ["bash", str(ROOT / "cluster" / "ci" / "ray_up_local.sh"), str(tmp_path), "configs/toy/25gaussians.yaml",
           "--name", "up", "--samples", "1", "--steps", "100", "--report-every", "50", "--max-concurrent", "1",
           "--param", "loss.r1_gamma=grid:0.002,0.02", "--eval-num", "500", *TOY_TINY]
    with subprocess.Popen(cmd, cwd=ROOT, env=_env(DDAEBM_PYTHON=sys.executable), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True) as p:
        try:
            out, _ = p.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the namespace's init dies, and everything inside with it
            out, _ = p.communicate()
            raise AssertionError(f"ray_up_local.sh overran 900 s:\n{out[-4000:]}") from None
    if p.returncode == 3:
        pytest.skip(f"cannot run ray up here: {out.strip()[-300:]}")
    assert p.returncode == 0, out[-6000:]
    s = _summary(tmp_path / "runs" / "sweeps", "up")
    assert len(s["trials"]) == 2 and all(t["error"] is None for t in s["trials"]), s
    assert (tmp_path / "runs" / "sweeps" / "up" / "best.yaml").is_file()
    assert "No nodes remaining" in out  # ray down
    print(f"\nray up + ray submit (2-trial sweep) + ray down: {time.time() - t0:.1f} s")


def _free_port() -> int:
    from ddaebm.distributed import free_port

    return free_port()
