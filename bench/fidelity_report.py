"""What bench/fidelity.py's run dirs hold, as figures and a table: the curves, the newest grids, the Table-5 rows.

    python bench/fidelity.py --plot OUT.png RUN_DIR [RUN_DIR ...]     FID, AUROC, modes, KL against minutes
    python bench/fidelity.py --table RUN_DIR [RUN_DIR ...]            one Markdown row per run and per floor

A run dir holds ROWS (one JSON line per evaluation, `--eval-only` ones marked `eval_only`); a floor dir
(`--floor`) holds FLOOR instead: the same measurements on real data, drawn as horizontal lines and tabled as
"real data".
"""

from __future__ import annotations

import json
from pathlib import Path

ROWS = "fidelity.jsonl"
FLOOR = "floor.jsonl"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_floor(run_dir: Path) -> bool:
    return (Path(run_dir) / FLOOR).is_file() and not (Path(run_dir) / ROWS).is_file()


def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / ROWS
    if not path.is_file():
        raise SystemExit(f"{path} does not exist")
    return _lines(path)


PANELS = ("fid", "auroc", "modes", "kl")
"""The curves' panels, in order; a figure draws those its rows hold (a StackedMNIST run without FID: modes, KL)."""


def panels(runs: list[list[dict]], floors: list[dict] = ()) -> list[str]:
    """The PANELS some row of some run (or floor) measured."""
    rows = [r for rows in runs for r in rows] + list(floors)
    return [key for key in PANELS if any(r.get(key) not in (None, {}) for r in rows)]


def plot(out: Path, run_dirs: list[Path], labels: list[str] | None, x: str = "minutes") -> None:
    """OUT: FID, AUROC, StackedMNIST modes and reverse KL against training minutes, each panel where some row has
    it; OUT-grids.png: each run's newest grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    floors = [row for d in run_dirs if is_floor(d) for row in _lines(Path(d) / FLOOR)]
    run_dirs = [d for d in run_dirs if not is_floor(d)]
    runs = [read_rows(d) for d in run_dirs]
    labels = labels or [rows[-1].get("label", Path(d).name) if rows else Path(d).name
                        for d, rows in zip(run_dirs, runs)]
    keys = panels(runs, floors) or ["fid"]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), dpi=110, squeeze=False)
    ax = dict(zip(keys, axes[0]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"mnist": "-", "uniform": ":", "constant": "-."}
    at = (lambda r: r["train_minutes"]) if x == "minutes" else (lambda r: r["images_seen"] / 1000)  # noqa: E731
    for i, (all_rows, label) in enumerate(zip(runs, labels)):
        c = colors[i % len(colors)]
        rows = [r for r in all_rows if not r.get("eval_only")]  # one curve: the in-loop rows (one --num)
        finals = [r for r in all_rows if r.get("eval_only")]  # --eval-only rows: stars
        t = [at(r) for r in rows]
        for key in ("fid", "modes", "kl"):
            if key not in ax:
                continue
            if any(r.get(key) is not None for r in rows):
                ax[key].plot(t, [r.get(key) for r in rows], "-o", color=c, ms=3, label=label)
            for r in (r for r in finals if r.get(key) is not None):
                ax[key].plot([at(r)], [r[key]], "*", color=c, ms=10)
        if "fid" in ax and any(r.get("fid_refine") is not None for r in rows):
            ax["fid"].plot(t, [r.get("fid_refine") for r in rows], "--", color=c, alpha=0.7)
        for name in sorted({k for r in rows for k in r.get("auroc", {})}):
            ax["auroc"].plot(t, [r["auroc"].get(name) for r in rows], styles.get(name, "--"), color=c,
                             label=f"{label} vs {name}")
    for row in floors:  # real data: what a perfect generator scores with the same code
        for num, value in (row.get("fid") or {}).items():
            ax["fid"].axhline(value, color="gray", ls=":", lw=1)
            ax["fid"].annotate(f"real data, N={num}", (1, value), xycoords=("axes fraction", "data"), ha="right",
                               va="bottom", fontsize=7, color="gray")
        for key in ("modes", "kl"):
            if row.get(key) is not None:
                ax[key].axhline(row[key], color="gray", ls=":", lw=1, label="real data")
    xlabel = "training minutes" if x == "minutes" else "thousands of images seen"
    titles = {"fid": dict(ylabel="FID (dashed: with refinement)", yscale="log", title="FID"),
              "auroc": dict(ylabel="AUROC of f(x, 0)", ylim=(0, 1.02), title="OOD AUROC"),
              "modes": dict(ylabel="covered modes (of 1000)", title="StackedMNIST modes"),
              "kl": dict(ylabel="reverse KL of the mode histogram (nats)", yscale="log",
                         title="StackedMNIST reverse KL")}
    for key, a in ax.items():
        a.set(xlabel=xlabel, **titles[key])
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    grids = [sorted((Path(d) / "fidelity").glob("grid-0*.png")) for d in run_dirs]
    fig, axes = plt.subplots(1, len(run_dirs), figsize=(3.2 * len(run_dirs), 3.6), dpi=110, squeeze=False)
    for ax, files, label, rows in zip(axes[0], grids, labels, runs):
        if files:
            ax.imshow(Image.open(files[-1]), cmap="gray")
        step = rows[-1]["step"] if rows else "?"
        ax.set_title(f"{label} (step {step})", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out.with_name(out.stem + "-grids.png"))
    plt.close(fig)
    print(f"wrote {out} and {out.with_name(out.stem + '-grids.png')}")


def table_row(rows: list[dict]) -> dict:
    """The row a run is judged by: its newest `--eval-only` row (the large-sample FID), else its newest row."""
    finals = [r for r in rows if r.get("eval_only")]
    return (finals or rows)[-1]


def _fid_cell(value: float | None, num: int | None) -> str:
    return "" if value is None else f"{value:.1f} ({num})"


def _refined_cell(row: dict) -> str:
    """The refined FID with its sample count and step size s; on a subset of the samples, also the same subset's
    unrefined FID (FID's bias grows as 1/N, so only that one compares with it)."""
    if row.get("fid_refine") is None:
        return ""
    cell = f"{row['fid_refine']:.1f} ({row['refine_num']}, s = {row['refine_step']:g})"
    if row["refine_num"] != row.get("num") and row.get("fid_refine_base") is not None:
        cell += f"; unrefined {row['fid_refine_base']:.1f}"
    return cell


def table(run_dirs: list[Path], labels: list[str] | None = None) -> str:
    """Markdown: per run its `table_row` (FID at its sample count in brackets, AUROC of f(x, 0) per OOD set,
    StackedMNIST modes / reverse KL where measured); per floor dir its real-data figures (FID at every count)."""
    entries = []  # (label, row, is_floor)
    for i, d in enumerate(map(Path, run_dirs)):
        floor = is_floor(d)
        for row in (_lines(d / FLOOR) if floor else [table_row(read_rows(d))]):
            label = labels[i] if labels else row.get("label", d.name)
            entries.append((label, row, floor))
    sets = list(dict.fromkeys(name for _, row, _ in entries for name in row.get("auroc", {})))
    modes = any(row.get("modes") is not None for _, row, _ in entries)
    head = (["variant", "step", "train min", "FID (samples)", "refined FID (samples)"]
            + [f"AUROC vs {name}" for name in sets] + (["modes", "reverse KL"] if modes else []))
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row, floor in entries:
        if floor:
            fids = sorted(row.get("fid", {}).items(), key=lambda kv: -int(kv[0]))  # every count: in-loop rows use fewer
            cells = [label, "", "", "; ".join(_fid_cell(value, num) for num, value in fids), ""]
        else:
            cells = [label, str(row["step"]), f"{row['train_minutes']:.0f}",
                     _fid_cell(row.get("fid"), row.get("num")), _refined_cell(row)]
        cells += [f"{row['auroc'][name]:.3f}" if name in row.get("auroc", {}) else "" for name in sets]
        if modes:
            cells += [str(row.get("modes", "")), f"{row['kl']:.3f}" if row.get("kl") is not None else ""]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
