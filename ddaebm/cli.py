"""`ddaebm` command line: train, sample, density, eval, print-config.

Bad input (an unknown key or a value out of its range, a missing file, a run dir without checkpoint, a run dir
another trainer holds, a checkpoint that does not verify or would run code: ddaebm.errors.BadInput) ends with a
one-line `ddaebm: error: ...` on stderr, exit status 2, and nothing written; any other exception is a bug and keeps
its traceback (exit 1).

`train` runs on one process, or on every rank of a launcher with `dist.backend=deepspeed`:
    torchrun --nproc_per_node 2 -m ddaebm train CONFIG dist.backend=deepspeed [dist.zero_stage=1] [...]
Exit status: 0 done (or --slice-steps reached), 2 bad input, 143 preempted by SIGTERM/SIGUSR1 after a
checkpoint (run the same command again to resume), 3 stopped by train.max_nonfinite, 4 the run dir could not be
written (disk full, I/O error, permission; the checkpoints before are intact), 1 any other failure (on several
ranks: a dead peer or a collective timeout, dist.timeout_s).
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from ddaebm.config.arguments import count, finite, seed, step_size
from ddaebm.errors import BadInput

EXIT_USAGE = 2
EXIT_FAILED = 1
# A full disk or quota met while training writes logs or snapshots: exit 4 as a failed checkpoint write
# (EXIT_WRITE_FAILED), with one line; other OSErrors are failures of the machine and keep their traceback.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def load_config(path, overrides=(), name=None):
    """ddaebm.config.load_config, imported on first use (the command line installs its signal handlers first)."""
    from ddaebm.config import load_config as load

    return load(path, overrides, name)


def _train(args) -> int:
    from ddaebm import distributed
    from ddaebm.config import to_yaml
    from ddaebm.launch import check_data_present, check_launch
    from ddaebm.rundir import checked_run_dir
    from ddaebm.training.loop import default_run_dir
    from ddaebm.training.resume import start_here, start_ranked

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.seed is not None:
        overrides.append(f"train.seed={args.seed}")
    cfg = load_config(args.config, overrides)
    env = distributed.discover()
    check_launch(cfg, env.world)
    check_data_present(cfg)
    run_dir = checked_run_dir(args.run_dir, default_run_dir(cfg))
    if not distributed.needs_group(env, cfg.dist.backend):
        start = start_here(cfg, run_dir, args.resume)  # the run dir's lock, held until the job ends
        try:
            print(to_yaml(cfg), end="", flush=True)
            return _train_here(cfg, run_dir, start.state, env, args.slice_steps)
        finally:
            start.release()
    # With a process group, every exit goes through distributed.shutdown/abort (never returns).
    start = None
    try:
        distributed.init(env, cfg.dist.backend, cfg.dist.timeout_s, cfg.dist.device)
        # Rank 0 picks and verifies the checkpoint (and converts it for another world size) once, the others wait
        # for its choice and load the same one (ddaebm/training/resume.py).
        start = start_ranked(cfg, run_dir, args.resume, env.rank, env.world)
        if env.lead:
            print(to_yaml(cfg), end="", flush=True)
        code = _train_here(cfg, run_dir, start.state, env, args.slice_steps)
    except BadInput as err:  # on every rank alike: a config, or a run dir/checkpoint rank 0 found bad
        print(f"ddaebm: error: {err}", file=sys.stderr)
        distributed.abort(EXIT_USAGE)
    except BaseException:  # noqa: BLE001 - a dead peer, a timeout, Ctrl-C: leave now, do not wait for others
        import traceback

        traceback.print_exc()
        print(f"ddaebm: error: rank {env.rank}/{env.world} failed", file=sys.stderr)
        distributed.abort(EXIT_FAILED)
    start.release()
    distributed.shutdown(code)


def _train_here(cfg, run_dir, state, env, slice_steps) -> int:
    from ddaebm.checkpoint import CheckpointWriteError
    from ddaebm.training.loop import train
    from ddaebm.training.preemption import (EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_WRITE_FAILED, NonFiniteStop,
                                            Preempted)

    try:
        train(cfg, run_dir, state, env.rank, env.world, slice_steps=slice_steps)
    except Preempted:
        return EXIT_PREEMPTED
    except NonFiniteStop as err:
        print(f"ddaebm: error: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except CheckpointWriteError as err:
        print(f"ddaebm: error: {err}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    except OSError as err:
        if err.errno not in _DISK_FULL:
            raise
        print(f"ddaebm: error: cannot write to the run dir ({err}); the checkpoints written before are intact: "
              "free space and run the same command again to resume", file=sys.stderr)
        return EXIT_WRITE_FAILED
    return 0


def _output_path(path: str, suffix: str, also: tuple[str, ...] = ()) -> Path:
    """--out FILE with `suffix` in an existing folder this process can write (`also`: the suffixes of files written
    beside it), checked before anything is computed."""
    import os

    out = Path(path)
    if out.suffix != suffix or not out.stem:
        raise BadInput(f"--out {path}: expected a {suffix} file")
    if not out.parent.is_dir():
        raise BadInput(f"--out {path}: folder {out.parent} does not exist")
    for file in (out, *(out.with_suffix(s) for s in also)):
        if file.is_dir():
            raise BadInput(f"--out {path}: {file} is a folder")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise BadInput(f"--out {path}: no permission to write in {out.parent}")
    return out


def _run_dir(path: str) -> Path:
    run_dir = Path(path)
    if not path.strip() or not run_dir.is_dir():
        raise BadInput(f"run dir {path!r} {'is not a folder' if run_dir.exists() else 'does not exist'}")
    return run_dir


def _sample(args) -> int:
    import numpy as np

    from ddaebm.data.stream import is_toy
    from ddaebm.model import Model

    run_dir = _run_dir(args.run_dir)
    out = Path(args.out)
    if not out.parent.is_dir():  # checked before the (slow) restore: bad input fails at once
        raise BadInput(f"--out {args.out}: folder {out.parent} does not exist")
    model = Model.from_run(run_dir)
    model.set_refine_step(args.refine_step)
    if not is_toy(model.cfg):
        return _sample_images(model, args)
    out = _output_path(args.out, ".npy")
    x = model.generate(args.num, args.seed, args.refine, use_ema=False if args.raw else None)
    np.save(out, x.cpu().numpy())
    print(f"wrote {args.num} samples (step {model.step}{', refined' if args.refine else ''}) to {out}")
    return 0


def _sample_images(model, args) -> int:
    """Image samples into the folder --out: .npz batches of uint8 NHWC images with their indices, grid.png.

    Under a launcher (torchrun, srun) each rank takes a contiguous block of the indices 0..num−1; sample i comes
    from its own seed, so the files hold the same images whatever --batch or the number of ranks.
    """
    import numpy as np

    from ddaebm import distributed
    from ddaebm.data.pixels import save_grid, to_uint8
    from ddaebm.fsio import write_atomic_bytes

    out = Path(args.out)
    if out.suffix or not out.parent.is_dir() or (out.exists() and not out.is_dir()):
        raise BadInput(f"--out {args.out}: image samples go into a folder (its parent must exist)")
    out.mkdir(exist_ok=True)
    env = distributed.discover()
    start, stop = env.rank * args.num // env.world, (env.rank + 1) * args.num // env.world
    use_ema = False if args.raw else None
    prep = model.cfg.data.preprocess
    for lo in range(start, stop, args.batch):
        idx = list(range(lo, min(lo + args.batch, stop)))
        x = model.generate(len(idx), args.seed, args.refine, use_ema=use_ema, indices=idx, batch=len(idx))
        write_atomic_bytes(out / f"samples-{idx[0]:07d}-{idx[-1] + 1:07d}.npz",
                           _npz_bytes(images=to_uint8(x, prep), indices=np.asarray(idx, dtype=np.int64)))
    if env.lead:
        grid = list(range(min(64, args.num)))
        x = model.generate(len(grid), args.seed, args.refine, use_ema=use_ema, indices=grid)
        save_grid(out / "grid.png", to_uint8(x, prep))
    print(f"rank {env.rank}/{env.world}: wrote samples {start}..{stop - 1} (step {model.step}"
          f"{', refined' if args.refine else ''}) to {out}", flush=True)
    return 0


def _npz_bytes(**arrays) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _density(args) -> int:
    import numpy as np

    from ddaebm.model import Model
    from ddaebm.plots import save_density

    lo, hi = args.range
    if not lo < hi:
        raise BadInput(f"--range {lo} {hi}: need LO < HI")
    out = _output_path(args.out, ".npy", also=(".png",))
    model = Model.from_run(_run_dir(args.run_dir))
    _, f = model.density(args.grid, lo, hi, use_ema=False if args.raw else None)
    np.save(out, f)
    save_density(out.with_suffix(".png"), f, lo, hi, f"exp f(x, 0), step {model.step}")
    print(f"wrote f(x, 0) on a {args.grid}x{args.grid} grid over [{lo}, {hi}]² to {out} and {out.with_suffix('.png')}")
    return 0


def _print_config(args) -> int:
    from ddaebm.config import to_yaml

    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the house's error: one line `ddaebm: error: ...`, exit status 2 (no usage block)."""

    def error(self, message: str):
        where = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        print(f"ddaebm: error: {where}{message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ddaebm", description="Denoising Diffusion Adversarial EBMs")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (resumes automatically from the run dir)",
                       usage="ddaebm train CONFIG [--run-dir DIR] [--steps N] [--seed S] [--resume R]\n"
                             "       [--slice-steps N] [key=value ...]")
    t.add_argument("config")
    t.add_argument("--run-dir", help="run directory (default runs/<config name>)")
    t.add_argument("--steps", type=count(1), help="total training iterations (train.steps)")
    t.add_argument("--seed", type=seed, help="train.seed")
    t.add_argument("--resume", default="auto", help="auto (default), never, or a checkpoint path")
    t.add_argument("--slice-steps", type=count(1),
                   help="stop (with a checkpoint) after this many iterations of this job")
    t.set_defaults(fn=_train)

    s = sub.add_parser("sample", help="draw samples with the 4-step sampler")
    s.add_argument("run_dir")
    # --num-samples: the spelling to use under torchrun, whose own parser takes --num for an abbreviation of
    # --numa-binding.
    s.add_argument("--num", "--num-samples", dest="num", type=count(1, 1 << 24), required=True)
    s.add_argument("--out", required=True, help="FILE.npy (toy) or a folder (images: .npz batches and grid.png)")
    s.add_argument("--batch", type=count(1, 1 << 20), default=256,
                   help="images per .npz file and per generator batch")
    s.add_argument("--refine", action="store_true", help="one energy refinement step (sample.refine_step)")
    s.add_argument("--refine-step", type=step_size, metavar="S",
                   help="refine with step size S (implies --refine; default: the run's sample.refine_step)")
    s.add_argument("--seed", type=seed, default=0)
    s.add_argument("--raw", action="store_true", help="raw generator instead of its EMA (sample.use_ema)")
    s.set_defaults(fn=_sample)

    d = sub.add_parser("density", help="the energy f(x, k=0) on a grid, .npy and .png")
    d.add_argument("run_dir")
    d.add_argument("--grid", type=count(2, 1 << 14), required=True)
    d.add_argument("--range", type=finite, nargs=2, required=True, metavar=("LO", "HI"))
    d.add_argument("--out", required=True, help="FILE.npy")
    d.add_argument("--raw", action="store_true", help="raw energy instead of its EMA (eval.energy_ema)")
    d.set_defaults(fn=_density)

    e = sub.add_parser("eval", help="metrics of a trained run")
    esub = e.add_subparsers(dest="kind", required=True)
    from ddaebm.evaluation.parsers import add_eval_parsers

    add_eval_parsers(esub)  # toy, fid, is, ood, modes, nll (ddaebm/evaluation/)

    c = sub.add_parser("print-config", help="the resolved, typed config",
                       usage="ddaebm print-config CONFIG [key=value ...]")
    c.add_argument("config")
    c.set_defaults(fn=_print_config)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        # SIGTERM/SIGUSR1 caught from here on, before the imports and set-up that take seconds: the training loop
        # answers a signal that came meanwhile after its first iteration (checkpoint, exit 143).
        from ddaebm.training.preemption import stop_signals

        with stop_signals():
            return _main(argv)
    return _main(argv)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    # key=value overrides may come anywhere after the config (argparse cannot mix them with subcommands).
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad or (extra and args.command not in ("train", "print-config")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    args.overrides = extra
    if getattr(args, "refine_step", None) is not None:  # a step size given means refine with it
        args.refine = True
    try:
        return args.fn(args)
    except BadInput as err:  # anything else is a bug or a failure, and keeps its traceback (exit 1)
        print(f"ddaebm: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
