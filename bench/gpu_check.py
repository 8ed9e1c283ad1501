"""The GPU acceptance check: everything that has never run on a GPU, once, in one short script.

    python bench/gpu_check.py [--out DIR] [--only NAME[,NAME]] [--quick] [--device cuda|cpu]

Sized for ≤ 8 minutes on one H100/H200. Prints one JSON line per check ({"check", "status": ok | skipped |
failed, fields..., "seconds"}), each in its own try so one failure hides nothing, then a summary line; writes
all rows to DIR/gpu_check.json. `--quick --device cpu` runs every check at toy sizes on the CPU (the CUDA-only
ones report "skipped"), which is what tests/test_gpu_check.py does so the script itself cannot rot.

Checks: stats_contract, deepspeed_stages, fp16, lsun_speed, r1_precision, host_syncs, checkpoint_roundtrip,
universal_conversion, dali_formats, fused_adam, toy. Two or more GPUs: bench/gpu_check_multi.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.gpu_checks import CHECKS, Skip  # noqa: E402


@dataclass
class Context:
    device: torch.device
    quick: bool
    tmp: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def run_check(name: str, fn, ctx: Context) -> dict:
    t0 = time.perf_counter()
    try:
        row = {"check": name, "status": "ok", **fn(ctx)}
    except Skip as why:
        row = {"check": name, "status": "skipped", "reason": str(why)}
    except Exception as err:  # noqa: BLE001 - report, and go on to the next check
        row = {"check": name, "status": "failed", "error": f"{type(err).__name__}: {err}",
               "trace": traceback.format_exc()[-2000:]}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(row, default=str), flush=True)
    if ctx.cuda:
        torch.cuda.empty_cache()
    return row


def process_group(device: torch.device) -> None:
    """One rank's process group (DeepSpeed needs one even alone)."""
    from ddaebm import distributed

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(distributed.free_port()))
    distributed.init(distributed.discover(), "deepspeed", 900, device.type)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--only", help="comma-separated check names")
    p.add_argument("--quick", action="store_true", help="toy sizes (for a CPU dry run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    info = {"check": "device", "status": "ok", "device": str(device), "torch": torch.__version__,
            "cuda": torch.version.cuda, "name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    print(json.dumps(info), flush=True)
    process_group(device)
    names = a.only.split(",") if a.only else list(CHECKS)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [info] + [run_check(n, CHECKS[n], Context(device, a.quick, Path(tmp))) for n in names]
    counts = {s: sum(r["status"] == s for r in rows[1:]) for s in ("ok", "skipped", "failed")}
    print(json.dumps({"summary": counts, "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "gpu_check.json").write_text(json.dumps(rows, indent=1, default=str))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
