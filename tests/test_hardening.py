"""The run directory under faults: checkpoints that would run code, a second trainer, checkpoints that do not
verify, killed and failed writes, step targets, signals at start-up (ddaebm/checkpoint/, ddaebm/rundir.py,
ddaebm/training/resume.py, issue 19). In-process `ddaebm.cli.main` where a fresh interpreter is not the point."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ddaebm.checkpoint import CheckpointWriteError, load_state, sealed_checkpoints, step_folders
from ddaebm.rundir import RunLock
from tests.conftest import CONFIGS, TINY, one_process
from tests.dist_utils import ds_env

CFG = str(CONFIGS / "toy" / "25gaussians.yaml")
ARGS = [*TINY, "train.eval_at_end=false", "train.ckpt_every=4"]


def _main(args, capsys):
    """The CLI in this process: (exit status, stdout, stderr)."""
    from ddaebm.cli import main

    capsys.readouterr()
    with one_process():
        code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def _train(run, steps, capsys, *extra):
    return _main(["train", CFG, "--run-dir", run, "--steps", steps, *ARGS, *extra], capsys)


def _ok(r):
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def _error(r, text, code=2):
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("ddaebm: error:")]
    assert len(lines) == 1 and text in lines[0], r.stderr
    if code == 2:
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r


def _snapshot(folder):
    """Every file under `folder` with its content (to show that nothing was written)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _ckpt(run, step):
    return run / "checkpoints" / f"step-{step:09d}"


def _reseal(folder):
    """Rewrite a checkpoint's manifest for its current files (what someone planting a file would do)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest = {str(p.relative_to(folder)): [p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()]
                for p in files}
    (folder / "manifest.json").write_text(json.dumps(manifest))


class _Marker:
    """Unpickling this creates the file `path`: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.makedirs, (self.path,))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run to step 8 (checkpoints 4 and 8), trained once; tests copy it."""
    import shutil

    from ddaebm.cli import main

    run = tmp_path_factory.mktemp("trained") / "run"
    with one_process():
        assert main(["train", CFG, "--run-dir", str(run), "--steps", "8", *ARGS]) == 0
    return lambda dest: shutil.copytree(run, dest) and dest


# ---------------------------------------------------------------------------------------------- code in pickles

@pytest.mark.parametrize("manifest", [True, False])
def test_a_planted_state_pt_runs_nothing_and_is_refused(tmp_path, trained, capsys, manifest):
    run = trained(tmp_path / "run")
    marker = tmp_path / "PWNED"
    state = torch.load(_ckpt(run, 8) / "state.pt", weights_only=True)
    state["extra"] = _Marker(marker)
    torch.save(state, _ckpt(run, 8) / "state.pt")
    if manifest:
        _reseal(_ckpt(run, 8))
    else:
        (_ckpt(run, 8) / "manifest.json").unlink()
    before = _snapshot(run)
    if manifest:  # auto resume, sample, density, eval: refused, not skipped
        _error(_train(run, 12, capsys), "os.makedirs")
        _error(_main(["sample", run, "--num", "5", "--out", tmp_path / "x.npy"], capsys), "os.makedirs")
        _error(_main(["density", run, "--grid", "5", "--range", "-1", "1", "--out", tmp_path / "d.npy"], capsys),
               "refused")
        _error(_main(["eval", "toy", run, "--num", "50"], capsys), "refused")
    _error(_train(run, 12, capsys, "--resume", _ckpt(run, 8)), "nothing was executed")
    _error(_train(run, 12, capsys, "--resume", _ckpt(run, 8) / "state.pt"), "refused")
    assert not marker.exists() and _snapshot(run) == before and not (tmp_path / "x.npy").exists()


def test_checkpoints_hold_plain_data_and_the_previous_format_still_loads(tmp_path, trained, capsys):
    run = trained(tmp_path / "run")
    state = load_state(_ckpt(run, 8))
    assert state["step"] == 8 and state["format"] == 2 and isinstance(state["config"], dict)
    raw = torch.load(_ckpt(run, 8) / "state.pt", weights_only=True)
    assert isinstance(raw["config"], str) and isinstance(raw["rng"]["torch"], torch.Tensor)
    # format 1: the config as a dict, no format key; read with weights_only all the same
    raw["config"] = state["config"]
    del raw["format"]
    torch.save(raw, _ckpt(run, 8) / "state.pt")
    _reseal(_ckpt(run, 8))
    assert "resumed at step 8/12" in _ok(_train(run, 12, capsys)).stdout


# ---------------------------------------------------------------------------------------------- the lock

def test_a_second_trainer_is_refused_naming_the_holder(tmp_path, trained, capsys):
    run = trained(tmp_path / "run")
    holder = RunLock(run)
    holder.acquire()
    holder.record()
    try:
        before = _snapshot(run)
        r = _error(_train(run, 12, capsys), "in use by another trainer")
        assert f"pid {os.getpid()}" in r.stderr and "host" in r.stderr
        _error(_train(run, 12, capsys, "--seed", "1"), "in use")  # another experiment: the lock answers first
        assert _snapshot(run) == before
    finally:
        holder.release()
    assert not (run / "lock").exists()
    assert "resumed at step 8/12" in _ok(_train(run, 12, capsys)).stdout
    assert not (run / "lock").exists()  # released (and removed) at the end


def test_the_lock_of_a_killed_holder_is_free(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    code = ("import sys, time; from ddaebm.rundir import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
            "lock.record(); print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(run)], env=ds_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match=f"pid {p.pid}"):
            RunLock(run).acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    lock = RunLock(run)  # kill -9 left the file, not the lock
    lock.acquire()
    lock.release()


# ---------------------------------------------------------------------------------------------- selection

def test_the_newest_sealed_checkpoint_wins_over_latest(tmp_path, trained, capsys):
    run = trained(tmp_path / "run")
    (run / "checkpoints" / "latest").write_text("step-000000004\n")  # killed between the rename and the pointer
    assert "resumed at step 8/12" in _ok(_train(run, 12, capsys)).stdout


def test_a_checkpoint_without_manifest_is_never_resumed_automatically(tmp_path, trained, capsys):
    run = trained(tmp_path / "run")
    (_ckpt(run, 8) / "manifest.json").unlink()
    data = bytearray((_ckpt(run, 8) / "state.pt").read_bytes())
    data[-30:-26] = bytes(b ^ 0xFF for b in data[-30:-26])  # 4 bytes flipped: nothing can tell without a manifest
    (_ckpt(run, 8) / "state.pt").write_bytes(bytes(data))
    r = _ok(_train(run, 12, capsys))
    assert "resumed at step 4/12" in r.stdout and "no manifest.json" in r.stderr
    assert (run / "checkpoints" / "corrupt" / "step-000000008" / "WHY.txt").is_file()
    assert [p.name for p in step_folders(run)] == ["step-000000004", "step-000000008", "step-000000012"]


def test_explicit_resume_of_a_checkpoint_without_manifest_warns(tmp_path, trained, capsys):
    run = trained(tmp_path / "run")
    (_ckpt(run, 4) / "manifest.json").unlink()
    r = _ok(_train(run, 12, capsys, "--resume", _ckpt(run, 4)))
    assert "resumed at step 4/12" in r.stdout and "cannot be checked" in r.stderr
    # the newer checkpoint 8 would outrank the continued run: set aside, not deleted
    assert (run / "checkpoints" / "superseded" / "step-000000008" / "state.pt").is_file()
    assert [p.name for p in sealed_checkpoints(run)] == ["step-000000008", "step-000000012"]


def test_unreadable_newest_checkpoints_stop_the_run_or_are_set_aside(tmp_path, trained, capsys):
    """Issue 19 item 3: with every checkpoint truncated the run neither restarts silently nor loses its new
    checkpoints to the broken ones in pruning."""
    run = trained(tmp_path / "run")
    for ckpt in step_folders(run):
        with open(ckpt / "state.pt", "r+b") as f:
            f.truncate(1000)
    before = _snapshot(run)
    _error(_train(run, 16, capsys, "--slice-steps", "6"), "none of its 2 checkpoint(s) verifies")
    assert _snapshot(run) == before
    r = _ok(_train(run, 16, capsys, "--slice-steps", "6", "--resume", "never", "train.keep_ckpts=2"))
    assert "starting step 0/16" in r.stdout and "set aside" in r.stderr
    assert [p.name for p in step_folders(run)] == ["step-000000004", "step-000000006"]  # the new ones survive
    assert sorted(p.name for p in (run / "checkpoints" / "corrupt").iterdir()) == ["step-000000004",
                                                                                   "step-000000008"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000000006"
    assert "resumed at step 6/16" in _ok(_train(run, 16, capsys, "train.keep_ckpts=2")).stdout


def test_only_the_newest_broken_one_falls_back_and_is_set_aside(tmp_path, trained, capsys):
    run = trained(tmp_path / "run")
    with open(_ckpt(run, 8) / "state.pt", "r+b") as f:
        f.truncate(1000)
    r = _ok(_train(run, 16, capsys, "train.keep_ckpts=1"))
    assert "resumed at step 4/16" in r.stdout and "1000 bytes" in r.stderr
    assert [p.name for p in step_folders(run)] == ["step-000000016"]
    assert (run / "checkpoints" / "corrupt" / "step-000000008").is_dir()


def test_leftovers_of_killed_writers_are_removed_at_start(tmp_path, trained, capsys):
    run = trained(tmp_path / "run")
    tmp = run / "checkpoints" / ".step-000000012.tmp"
    (tmp / "engines").mkdir(parents=True)
    (tmp / "state.pt").write_bytes(b"partial")
    (run / "checkpoints" / ".latest.tmp4242").write_text("x")
    (run / ".config.yaml.tmp4242").write_text("x")
    r = _ok(_train(run, 12, capsys))
    assert "resumed at step 8/12" in r.stdout and "left by a writer that was killed" in r.stderr
    assert not tmp.exists() and not list(run.rglob("*.tmp4242"))


def test_a_step_target_below_the_run_is_refused(tmp_path, trained, capsys):
    run = trained(tmp_path / "run")
    before = _snapshot(run)
    _error(_train(run, 5, capsys), "train.steps=5 (--steps) is below step 8")
    assert _snapshot(run) == before
    assert "resumed at step 8/8" in _ok(_train(run, 8, capsys)).stdout  # equal: nothing to do, not an error


# ---------------------------------------------------------------------------------------------- failed writes

def test_a_failed_checkpoint_write_ends_with_one_line_and_leaves_the_earlier_ones(tmp_path, trained, capsys,
                                                                                   monkeypatch):
    from ddaebm.checkpoint import write

    run = trained(tmp_path / "run")
    real = write.write_state

    def full_disk(folder, state):
        (folder / "state.pt").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "state.pt"))

    monkeypatch.setattr(write, "write_state", full_disk)
    r = _error(_train(run, 16, capsys), "could not be written", code=4)
    assert "No space left" in r.stderr and "earlier checkpoints are intact" in r.stderr
    assert [p.name for p in step_folders(run)] == ["step-000000004", "step-000000008"]
    assert not list((run / "checkpoints").glob(".*tmp*"))
    monkeypatch.setattr(write, "write_state", real)
    assert "resumed at step 8/16" in _ok(_train(run, 16, capsys)).stdout


def test_checkpoint_writer_errors_are_checkpoint_write_errors(tmp_path):
    """The stages of save_checkpoint turn OSError/RuntimeError into one CheckpointWriteError and remove the
    temporary folder; an engine whose save fails counts the same."""
    from ddaebm.checkpoint import save_checkpoint

    class Broken:
        def save(self, folder):
            raise RuntimeError("[enforce fail at inline_container.cc] file write failed")

    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointWriteError, match="writing engine energy"):
        save_checkpoint(tmp_path / "run", 3, {"energy": Broken()}, lambda: {}, keep=2)
    assert not list((tmp_path / "run" / "checkpoints").iterdir())


def _small_tmpfs(path):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_a_full_disk_ends_the_job_cleanly_and_the_rerun_resumes(tmp_path):
    """A real ENOSPC: a 4 MiB tmpfs as run dir (needs mount rights; skipped without them)."""
    disk = tmp_path / "disk"
    if not _small_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here")
    try:
        run = disk / "run"
        args = ["train", CFG, "--run-dir", str(run), *TINY, "train.eval_at_end=false", "train.ckpt_every=1",
                "train.keep_ckpts=0", "train.log_every=1000"]
        r = subprocess.run([sys.executable, "-m", "ddaebm", *args, "--steps", "1000"], env=ds_env(), cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 4, r.stderr[-2000:]
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("ddaebm: error:"), r.stderr
        assert not list((run / "checkpoints").glob(".*tmp*"))
        newest = step_folders(run)[-1]
        for old in step_folders(run)[:-2]:  # free space
            subprocess.run(["rm", "-rf", str(old)], check=True)
        r = subprocess.run([sys.executable, "-m", "ddaebm", *args, "--steps", str(int(newest.name[5:]) + 2)],
                           env=ds_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and f"resumed at step {int(newest.name[5:])}" in r.stdout, r.stderr[-2000:]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ---------------------------------------------------------------------------------------------- signals

@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_during_start_up_stops_with_143(tmp_path, sig):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ddaebm", "train", CFG, "--run-dir", str(run), "--steps", "1000",
                             *ARGS], cwd=tmp_path, env=ds_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(0.5)  # importing torch, long before the first step
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert f"preempted ({sig.name})" in out and [p.name for p in step_folders(run)] == ["step-000000001"]
