"""Random input at every subcommand (hypothesis): each call finishes, or exits 2 with one line `ddaebm: error: …`
and leaves nothing behind; never a traceback, never a partly written run dir (issue 19).

`ddaebm train --steps 2` gets 1-3 random overrides of random schema keys (and some that are not keys) with values of
random types; sample, density, eval and print-config get random argument values against one tiny trained run. In
process (`ddaebm.cli.main`), a bounded number of examples: DDAEBM_FUZZ_EXAMPLES per test (default 40; ~1 minute
each on 2 cores). Not drawn here: `dist.backend=deepspeed` (its process group ends the process; the multi-rank
tests cover it).
"""

import os
import subprocess

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.conftest import CONFIGS, TINY, one_process  # noqa: E402

CFG = str(CONFIGS / "toy" / "25gaussians.yaml")
EXAMPLES = int(os.environ.get("DDAEBM_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
COUNTS = {"examples": 0, "finished": 0}


def _schema_keys() -> list[str]:
    from omegaconf import OmegaConf

    from ddaebm.config import Config

    def walk(node, prefix=""):
        for key in node:
            value = node._get_node(key)
            if OmegaConf.is_dict(value):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    return sorted(walk(OmegaConf.structured(Config)))


KEYS = _schema_keys() + ["loss.nope", "model", "train", "name", "nope", "train.steps.x", "dist..device", "base"]
WORDS = ["", "none", "null", "~", "abc", "${nope}", "${train.steps}", "${model.hidden}", "[]", "[1,2]", "{a: 1}",
         "cuda", "cpu", "auto", "torch", "fp16", "bf16", "fp32", "generic", "eval", "train", "batch", "drl",
         "geometric", "vp", "explicit", "cosine", "ncsnpp", "mnist_nice", "toy", "pil", "dali", "8gaussians", "moons",
         "cifar10", "elbo_encoder", "mse_prior_z", "kl_only", "no_latent", "energy_only", "skip", "logit", "64",
         "true", "false", "yes", "1e-3", "-0.0", "0x10", "1_000", ".5", "1e400", "-1e400", ".nan", "nan", "inf",
         "'quoted'", "a=b", "\\", "ä", "x/y"]
INTS = st.one_of(st.integers(-3, 40), st.sampled_from([0, -1, -(2 ** 40), 2 ** 31, 2 ** 62, 10 ** 30]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 2), st.floats(0, 1))
LISTS = st.lists(st.one_of(st.integers(-2, 6), st.floats(-1, 2, allow_nan=False)), max_size=6).map(
    lambda values: "[" + ",".join(map(str, values)) + "]")
VALUES = st.one_of(INTS.map(str), FLOATS.map(repr), st.booleans().map(str), st.sampled_from(WORDS), LISTS,
                   st.text(max_size=6))


def _typed(key: str):
    """Values of the key's own kind, mostly plausible (its choices, small numbers), so that the fuzz reaches
    training and not only the config's refusals."""
    from omegaconf import OmegaConf

    from ddaebm.config import CHOICES, Config

    if key in CHOICES:
        return st.sampled_from([str(c) for c in CHOICES[key] if c != "deepspeed"])
    try:
        default = OmegaConf.select(OmegaConf.structured(Config), key)
    except Exception:  # noqa: BLE001 - not a key
        return VALUES
    if isinstance(default, bool):
        return st.booleans().map(str)
    if isinstance(default, int):
        return st.integers(-1, max(2 * default, 8) if default < 64 else 64).map(str)
    if isinstance(default, float):
        return st.one_of(st.floats(0, 1), st.floats(0, 3 * abs(default) + 1e-3), st.floats(-1, 0)).map(repr)
    if default is None or OmegaConf.is_list(default):
        return LISTS
    return VALUES


KEYED = st.sampled_from(KEYS).flatmap(lambda key: st.tuples(st.just(key), st.one_of(*[_typed(key)] * 3, VALUES)))


def _call(args, capsys):
    """ddaebm.cli.main(args) in this process: (status, stdout, stderr); SystemExit (argparse) is a status too."""
    from ddaebm.cli import main

    capsys.readouterr()
    threads = torch.get_num_threads()
    try:
        with one_process():
            code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    finally:
        torch.set_num_threads(threads)  # train.threads is process-wide
    out, err = capsys.readouterr()
    COUNTS["examples"] += 1
    COUNTS["finished"] += code == 0
    return subprocess.CompletedProcess(args, code, out, err)


def _finished_or_one_line(r):
    assert r.returncode in (0, 2), (r.args, r.returncode, r.stderr[-3000:])
    if r.returncode == 2:
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ddaebm: error: "), (r.args, r.stderr[-3000:])


@FUZZ
@given(overrides=st.lists(KEYED, min_size=1, max_size=3))
def test_train_with_random_overrides(tmp_path_factory, capsys, overrides):
    items = [f"{key}={value}" for key, value in overrides]
    assume(not any(key == "dist.backend" and value.strip() == "deepspeed" for key, value in overrides))
    run = tmp_path_factory.mktemp("fuzz") / "run"
    r = _call(["train", CFG, "--run-dir", run, *TINY, "train.eval_at_end=false", *items, "--steps", "2"], capsys)
    _finished_or_one_line(r)
    if r.returncode == 2:
        assert not run.exists(), (items, sorted(p.name for p in run.rglob("*")))
    else:
        assert (run / "checkpoints" / "step-000000002" / "manifest.json").is_file() and (run / "config.yaml").is_file()
        assert not (run / "lock").exists()


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from ddaebm.cli import main

    run = tmp_path_factory.mktemp("fuzzrun") / "run"
    with one_process():
        assert main(["train", CFG, "--run-dir", str(run), "--steps", "2", *TINY, "train.eval_at_end=false"]) == 0
    (run.parent / "afile.npy").write_text("x")
    (run.parent / "adir.npy").mkdir()
    return run


def _paths(base):
    return st.sampled_from(["", ".", "out.npy", "out", "out.txt", "missing/out.npy", "afile.npy", "adir.npy",
                            "afile.npy/x.npy", str(base / "run"), "out dir/x.npy"])


ARG = st.one_of(INTS.map(str), FLOATS.map(repr), st.sampled_from(WORDS), st.text(max_size=4))


@st.composite
def subcommand(draw, base):
    run = draw(st.sampled_from([str(base / "run"), str(base / "run"), str(base / "afile.npy"), str(base / "nope"),
                                "", str(base)]))
    kind = draw(st.sampled_from(["sample", "density", "eval toy", "eval fid", "eval nll", "print-config"]))
    opt = lambda name, value: [name, value] if draw(st.booleans()) else []  # noqa: E731
    out = str(base / draw(_paths(base)))
    if kind == "sample":
        args = ["sample", run, *opt("--num", draw(ARG)), *opt("--out", out), *opt("--batch", draw(ARG)),
                *opt("--seed", draw(ARG))]
        args += draw(st.sampled_from([[], ["--refine"], ["--raw"]]))
    elif kind == "density":
        args = ["density", run, *opt("--grid", draw(ARG)), *opt("--out", out), *(["--range", draw(ARG), draw(ARG)]
                                                                                  if draw(st.booleans()) else [])]
    elif kind == "eval toy":
        args = ["eval", "toy", run, *opt("--num", draw(ARG)), *opt("--grid", draw(ARG)), *opt("--seed", draw(ARG))]
        args += ["--range", draw(ARG), draw(ARG)] if draw(st.booleans()) else []
    elif kind in ("eval fid", "eval nll"):
        args = [*kind.split(), run, *opt("--num", draw(ARG)), *opt("--batch", draw(ARG))]
    else:
        args = ["print-config", draw(st.sampled_from([CFG, run, out])),
                *[f"{k}={v}" for k, v in draw(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=2))]]
    return args + draw(st.sampled_from([[], [], ["--bogus"], ["x=1"], ["--num"]]))


def test_other_subcommands_with_random_arguments(toy_run, capsys):
    base = toy_run.parent
    metrics = lambda: {p.name: p.read_bytes() for p in toy_run.glob("metric-*.jsonl")}  # noqa: E731

    @FUZZ
    @given(args=subcommand(base))
    def check(args):
        outputs = set(base.iterdir())
        before = metrics()
        r = _call(args, capsys)
        _finished_or_one_line(r)
        if r.returncode == 2:
            assert set(base.iterdir()) == outputs and metrics() == before, args
        for p in set(base.iterdir()) - outputs:  # a finished call's outputs: gone before the next example
            import shutil

            shutil.rmtree(p) if p.is_dir() else p.unlink()

    check()


def test_zz_report_the_count():
    """How many inputs the two fuzz tests above threw (printed with -s; at least 2 × DDAEBM_FUZZ_EXAMPLES)."""
    print(f"fuzz: {COUNTS['examples']} random inputs, each finished ({COUNTS['finished']}) or refused in one line")
