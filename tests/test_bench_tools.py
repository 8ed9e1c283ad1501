"""bench/toy_ab.py: this checkout against a git revision, both trainers in one process."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "bench/toy_ab.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode != 0,
                    reason="not a git checkout")
def test_toy_ab_against_head_times_both_and_names_a_bad_revision():
    out = _run("HEAD", "data.batch=16", "--iters", "3", "--warmup", "1", "--reference-math")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "data.batch=16" in lines[0] and lines[1].startswith("HEAD ")
    assert lines[2].startswith("this checkout") and "ms/it" in lines[2]
    assert lines[3].startswith("difference")
    bad = _run("no-such-revision", "--iters", "1")
    assert bad.returncode != 0 and "no-such-revision" in bad.stderr
