"""`python -m data_shards verify DIR`: is every split in DIR complete and intact?"""

from __future__ import annotations

import io
import json
from pathlib import Path

from ddaebm.data.shards import FORMAT, ShardSet


def decode_problems(shards: ShardSet) -> list[str]:
    """Samples whose image PIL cannot fully decode or whose label is not an integer, named by shard and key."""
    from PIL import Image

    problems = []
    for i in range(shards.num_samples):
        try:
            with Image.open(io.BytesIO(shards.image_bytes(i))) as im:
                im.load()
            shards.label(i)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            problems.append(f"{shards.where(i)}: {type(e).__name__}: {e}")
    return problems


def split_problems(root: Path, name: str, split: str, decode: bool) -> tuple[list[str], int]:
    """(problems, number of samples) of one split: files present with the manifest's sizes and counts, sha256
    of every shard, and with `decode` every image and label."""
    try:
        shards = ShardSet(root, name, split)
    except (OSError, ValueError) as e:
        return [str(e)], 0
    try:
        problems = shards.verify()
        if decode:
            problems += decode_problems(shards)
        return problems, shards.num_samples
    finally:
        shards.close()


def verify_dir(root, name: str | None = None, split: str | None = None, decode: bool = False,
               log=print) -> list[str]:
    """All problems in `root` (empty: every manifest's split is intact); also flags partial files of a killed
    writer and tars that no manifest lists."""
    root = Path(root)
    if not root.is_dir():
        return [f"{root} is not a directory"]
    manifests = []
    for path in sorted(root.glob("*.json")):
        m = json.loads(path.read_text())
        if m.get("format") == FORMAT and name in (None, m["name"]) and split in (None, m["split"]):
            manifests.append(m)
    problems = [] if manifests else [f"{root}: no manifest" + (f" for {name}-{split}" if name or split else "")]
    listed = set()
    for m in manifests:
        found, n = split_problems(root, m["name"], m["split"], decode)
        listed |= {s["tar"] for s in m["shards"]}
        log(f"{m['name']}-{m['split']}: {n} samples in {len(m['shards'])} shards: "
            f"{'OK' if not found else f'{len(found)} problem(s)'}")
        problems += found
    problems += [f"{p}: partial file of a writer that did not finish" for p in sorted(root.glob(".*.partial"))]
    if name is None and split is None:
        problems += [f"{p}: no manifest lists this shard" for p in sorted(root.glob("*.tar")) if p.name not in listed]
    return problems
