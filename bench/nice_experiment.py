"""MNIST NICE: DDAEBM against maximum likelihood, same architecture and wall-clock budget (issue 6 experiment).

    python bench/nice_experiment.py --shards DIR --minutes 30 --out OUT [--config C] [--threads 1] [overrides ...]

`--method ddaebm` trains --config (default configs/mnist_nice.yaml, method.md §7.5; configs/small/mnist_nice.yaml
narrows the generator and encoder only) with the project's trainer; `--method mle` trains that config's NICEEnergy
at k = 0 by maximum likelihood on the dequantised logit data (Adam, the config's lr and batch).
Every `--eval-every` seconds of training the exact test log-likelihood (ddaebm.metrics.nice, the paper's logit
space convention) is appended to OUT/curve-<method>.jsonl; at the end exact samples (and for DDAEBM the 4-step
generator's) are written as PNG grids. Run the two methods side by side (one core each) for the same budget, then
`--plot` draws both curves into OUT/curves.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def test_ll(energy, shards: str, device, num: int) -> dict:
    from ddaebm.data.images import iterate_split
    from ddaebm.metrics.nice import log_likelihoods, summarize

    batches = iterate_split(shards, "mnist", "test", 500, 28, 1, preprocess="logit", loader="pil", workers=1)
    was = energy.training
    energy.eval()
    f, jac = log_likelihoods(energy, batches, device, num)
    energy.train(was)
    return summarize(f, jac, 784)


def save_exact(energy, path: Path, num: int = 64) -> None:
    from ddaebm.data.pixels import save_grid, to_uint8

    with torch.no_grad():
        save_grid(path, to_uint8(energy.sample(num, 0, torch.Generator().manual_seed(0)), "logit"))


def run_ddaebm(args, out: Path) -> None:
    from ddaebm.config import load_config
    from ddaebm.data.pixels import save_grid, to_uint8
    from ddaebm.training.trainer import Trainer

    cfg = load_config(args.config, [f"data.root={args.shards}", f"train.threads={args.threads}", *args.overrides])
    trainer = Trainer(cfg)
    loop(args, out, "ddaebm", trainer.train_step, lambda: trainer.model.sampling_networks(cfg.eval.energy_ema)[1],
         lambda: trainer.step * cfg.data.batch)
    _, energy = trainer.model.sampling_networks(cfg.eval.energy_ema)
    save_exact(energy, out / "exact-ddaebm.png")
    save_grid(out / "generator-ddaebm.png", to_uint8(trainer.model.generate(64, seed=0, batch=64), "logit"))


def run_mle(args, out: Path) -> None:
    from ddaebm.config import load_config
    from ddaebm.data.stream import build_stream
    from ddaebm.networks import build_energy

    cfg = load_config(args.config, [f"data.root={args.shards}", *args.overrides])
    torch.manual_seed(cfg.train.seed)
    energy = build_energy(cfg.model, cfg.diffusion.num_steps)
    opt = torch.optim.Adam(energy.parameters(), lr=cfg.optim.lr_d, betas=(0.9, 0.999))  # the usual NICE MLE Adam
    stream = build_stream(cfg)
    steps = [0]

    def step():
        x = stream.next_batch()
        loss = -energy(x, torch.zeros(len(x), dtype=torch.long)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps[0] += 1
        return {"nll": loss.detach()}

    loop(args, out, "mle", step, lambda: energy, lambda: steps[0] * cfg.data.batch)
    save_exact(energy, out / "exact-mle.png")


def loop(args, out: Path, method: str, step, energy_now, images_seen) -> None:
    """Train for --minutes of training time (evaluation excluded), evaluating every --eval-every seconds."""
    path = out / f"curve-{method}.jsonl"
    trained, next_eval, steps = 0.0, 0.0, 0
    while True:
        if trained >= next_eval or trained >= 60 * args.minutes:
            row = {"method": method, "train_seconds": round(trained, 1), "steps": steps, "images": images_seen(),
                   **test_ll(energy_now(), args.shards, "cpu", args.test_num)}
            with open(path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            next_eval += args.eval_every
            if trained >= 60 * args.minutes:
                return
        t0 = time.perf_counter()
        step()
        trained += time.perf_counter() - t0
        steps += 1


def plot(out: Path) -> None:
    from ddaebm.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    for path in sorted(out.glob("curve-*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        ax.plot([r["train_seconds"] / 60 for r in rows], [r["ll_logit_nats"] for r in rows], marker="o", ms=3,
                label=rows[0]["method"])
    ax.set_xlabel("training time (minutes, 1 core)")
    ax.set_ylabel("test log-likelihood (nats, logit space)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", help="folder with mnist-train and mnist-test shard sets")
    p.add_argument("--method", choices=("ddaebm", "mle"))
    p.add_argument("--config", default="configs/mnist_nice.yaml", help="an arch=mnist_nice config")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--eval-every", type=float, default=180.0, help="seconds of training between evaluations")
    p.add_argument("--test-num", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--plot", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot:
        plot(out)
        return
    torch.set_num_threads(args.threads)
    (run_ddaebm if args.method == "ddaebm" else run_mle)(args, out)


if __name__ == "__main__":
    main()
