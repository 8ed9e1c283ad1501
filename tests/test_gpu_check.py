"""bench/gpu_check.py, the one-shot GPU acceptance script, dry-run on the CPU at toy sizes: every check runs or
says why it cannot here, so the script is known to work before a GPU machine is at hand."""

import json
import subprocess
import sys

from tests.conftest import ROOT

CUDA_ONLY = {"fp16", "host_syncs", "dali_formats"}


def test_every_check_runs_on_the_cpu_or_names_what_it_lacks(tmp_path):
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--quick", "--device", "cpu", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    rows = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {row["check"]: row["status"] for row in rows}
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert {c for c, s in status.items() if s == "skipped"} == CUDA_ONLY, status
    assert all(s == "ok" for c, s in status.items() if c not in CUDA_ONLY), status
    by = {row["check"]: row for row in rows}
    assert by["checkpoint_roundtrip"]["bit_exact"] and by["fused_adam"]["bit_exact"]
    assert by["r1_precision"]["rel_err_bf16_r1_fp32"] == 0.0
    assert all(v["agree"] for k, v in by["deepspeed_stages"].items() if ":" in k)
    assert json.loads(r.stdout.strip().splitlines()[-1])["summary"]["failed"] == 0
