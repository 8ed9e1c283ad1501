"""What a checkpoint's files may hold, and reading them without running code.

Run directories are shared between people and copied between clusters, so loading one must never execute
anything. A pickle can name any Python callable and have the unpickler call it; `torch.load(weights_only=True)`
refuses every callable outside a short allow-list (tensors, storages, containers, numbers, strings). So:

- state.pt holds only tensors, numbers, strings, None, lists, tuples and dicts: the config as YAML text, the
  random generators' states as uint8 tensors (`encode` checks it on write), and is read with `weights_only=True`.
  The previous format (the config as a dict) is plain data too and reads the same way.
- DeepSpeed's own files (engines/<name>/ds/*.pt, and a cached universal conversion) are read by DeepSpeed itself
  with `weights_only=False`. Before DeepSpeed sees them, `scan_engine_files` loads each with `weights_only=True`,
  allowing besides plain data only the three DeepSpeed classes its ZeRO optimizer files hold (a loss-scaler
  record, the ZeRO-stage enum, a fragment-address dataclass: built without calling anything but their
  constructors). A file that names anything else is refused.

A refusal is `UnsafeCheckpoint`: one line naming the file and the callable, exit status 2, nothing executed.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
import yaml

from ddaebm.checkpoint.files import ENGINES, STATE_FILE, CheckpointError

FORMAT = 2  # 1: the config as a dict (read as well); 2: the config as YAML text
_PLAIN = (int, float, str, bool, bytes, type(None), torch.Tensor, torch.Size)
REQUIRED = ("step", "config", "engines")


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file that can be unpickled only by running code it names: refused, never skipped."""


def encode(state: dict) -> dict:
    """The state as state.pt stores it: the config as YAML text, the format number; anything but plain data and
    tensors is a bug here (TypeError), never something a reader would have to trust."""
    _check_plain(state, "state")
    out = dict(state, format=FORMAT)
    if isinstance(state.get("config"), dict):
        out["config"] = yaml.safe_dump(state["config"], sort_keys=False)
    return out


def _check_plain(value, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint {where}: key {key!r} is a {type(key).__name__}")
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"checkpoint {where} is a {type(value).__name__}: a checkpoint holds tensors and plain data "
                        "only (ddaebm/checkpoint/state.py)")


def write_state(folder: Path, state: dict) -> None:
    """state.pt in `folder`, synced (a failed write raises OSError: the caller removes the folder)."""
    with open(Path(folder) / STATE_FILE, "wb") as f:
        torch.save(encode(state), f)
        f.flush()
        os.fsync(f.fileno())


def _safe_load(file: Path, allowed=()):
    """torch.load without running code (memory-mapped, so only the pickle is read, where the file is torch's zip
    format; a legacy-format file is read whole)."""
    zipped = zipfile.is_zipfile(file)
    if not zipped and _head(file) != b"\x80\x02":  # neither torch's zip format nor its legacy pickle
        raise CheckpointError(f"{file} is not a torch checkpoint file (damaged, or something else)")
    with torch.serialization.safe_globals(list(allowed)):
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=zipped)
        except pickle.UnpicklingError as err:
            if "Weights only load failed" in str(err):
                raise UnsafeCheckpoint(f"{file} holds more than tensors and plain data ({_refusal(str(err))}): it "
                                       "could only be loaded by running code it names, so it is refused (nothing "
                                       "was executed)") from None
            raise CheckpointError(f"{file} cannot be read: {str(err).splitlines()[0][:200]}") from None
        except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{file} cannot be read: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0][:200] if str(err) else ''}") from None


def _head(file: Path) -> bytes:
    with open(file, "rb") as f:
        return f.read(2)


def _refusal(message: str) -> str:
    """What the weights-only unpickler refused, from its message (the callable it names, where it says)."""
    named = re.search(r"GLOBAL ([\w.]+)", message)
    if named:
        return f"it names {named.group(1)}"
    lines = [line.strip() for line in message.splitlines()[1:] if line.strip() and "documentation" not in line]
    return lines[0][:200] if lines else "refused by the weights-only unpickler"


def load_state(path: Path) -> dict:
    """The state of checkpoint folder (or state file) `path`, read without running code; its config as a dict.

    Raises UnsafeCheckpoint for a file that names code, CheckpointError for one that is missing, damaged, or
    lacks what every checkpoint holds (step, config, the engines' weights)."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no checkpoint at {path} ({file.name} missing)")
    state = _safe_load(file)
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a ddaebm checkpoint")
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"{file} has no {', '.join(repr(k) for k in missing)} entry: not a ddaebm checkpoint "
                              "(or a damaged one)")
    if isinstance(state["config"], str):
        try:
            state["config"] = yaml.safe_load(state["config"])
        except yaml.YAMLError:
            raise CheckpointError(f"{file}: its config is not valid YAML") from None
    if not isinstance(state["config"], dict) or not isinstance(state["step"], int) \
            or not isinstance(state["engines"], dict):
        raise CheckpointError(f"{file}: step, config or engines of the wrong kind: not a ddaebm checkpoint")
    return state


def _deepspeed_classes() -> list:
    """The DeepSpeed classes a ZeRO optimizer file holds besides plain data (deepspeed 0.19)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def scan_files(files: list[Path]) -> int:
    """Read each of `files` without running code, before DeepSpeed unpickles them: UnsafeCheckpoint for one that
    names anything but plain data and DeepSpeed's record classes. The number scanned."""
    files = [f for f in files if Path(f).suffix == ".pt"]
    allowed = _deepspeed_classes() if files else []
    for file in files:
        _safe_load(file, allowed)
    return len(files)


def scan_engine_files(path: Path, listed: list[Path] | None = None) -> int:
    """scan_files of the engine files of checkpoint folder `path`: those its manifest lists (`listed`), or every
    .pt under engines/ of a folder without one."""
    engines = Path(path) / ENGINES
    if listed is None:
        listed = sorted(engines.rglob("*.pt")) if engines.is_dir() else []
    return scan_files([f for f in listed if engines in Path(f).parents])
