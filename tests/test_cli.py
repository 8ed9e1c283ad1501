"""The command line end to end: train tiny, sample, density, eval, print-config, and one-line errors."""

import json

import numpy as np
import pytest
import yaml

from tests.conftest import CONFIGS, TINY, run_cli

CFG = str(CONFIGS / "toy" / "25gaussians.yaml")


def test_round_trip(tmp_path, cli_env):
    run = tmp_path / "run"
    r = run_cli(["train", CFG, "--run-dir", str(run), "--steps", "10", "--seed", "3", *TINY], tmp_path, cli_env)
    assert r.returncode == 0, r.stderr
    for name in ("config.yaml", "stats.jsonl", "reals.png", "samples.png", "density.png", "samples.npy",
                 "metric-toy.jsonl", "checkpoints/latest", "checkpoints/step-000000010/state.pt"):
        assert (run / name).exists(), name
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [5, 10] and "r1_excess" in stats[0]

    r = run_cli(["sample", str(run), "--num", "77", "--out", str(tmp_path / "x.npy")], tmp_path, cli_env)
    assert r.returncode == 0, r.stderr
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (77, 2) and np.isfinite(x).all()
    r = run_cli(["sample", str(run), "--num", "77", "--out", str(tmp_path / "xr.npy"), "--refine"], tmp_path,
                cli_env)
    assert r.returncode == 0, r.stderr
    xr = np.load(tmp_path / "xr.npy")
    assert not np.array_equal(xr, x)
    # --refine-step S: the same step x + S·∇f(x, 0) with S for the run's sample.refine_step (the toy default).
    default = float(yaml.safe_load((run / "config.yaml").read_text())["sample"]["refine_step"])
    r = run_cli(["sample", str(run), "--num", "77", "--out", str(tmp_path / "x3.npy"), "--refine-step",
                 str(3 * default)], tmp_path, cli_env)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "x3.npy") - x, 3 * (xr - x), rtol=1e-4, atol=1e-6)
    r = run_cli(["sample", str(run), "--num", "7", "--out", str(tmp_path / "xn.npy"), "--refine-step", "-1"],
                tmp_path, cli_env)
    assert r.returncode == 2 and "--refine-step" in r.stderr and "must be ≥ 0" in r.stderr

    r = run_cli(["density", str(run), "--grid", "30", "--range", "-2", "2", "--out", str(tmp_path / "d.npy")],
                tmp_path, cli_env)
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "d.npy").shape == (30, 30) and (tmp_path / "d.png").is_file()

    r = run_cli(["eval", "toy", str(run), "--num", "400", "--grid", "50"], tmp_path, cli_env)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (run / "metric-toy.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["num_samples"] == 400
    for key in ("modes_covered", "frac_within_3sigma", "mmd2", "sliced_w1", "grid_kl", "grid_tv"):
        assert key in rows[-1] and key in r.stdout

    # Running the same command again resumes and, being complete, trains no further.
    r = run_cli(["train", CFG, "--run-dir", str(run), "--steps", "10", "--seed", "3", *TINY], tmp_path, cli_env)
    assert r.returncode == 0 and "resumed at step 10/10" in r.stdout


def test_density_grid_orientation(tmp_path, cli_env):
    """Entry [i, j] is at (x = side[j], y = side[i]) (method.md §7.3)."""
    import torch

    from ddaebm.config import load_config
    from ddaebm.model import Model

    model = Model(load_config(CFG, TINY))
    side, f = model.density(5, -1.0, 1.0)
    with torch.no_grad():
        pts = torch.tensor([[side[3], side[1]], [side[1], side[3]]], dtype=torch.float32)
        direct = model.energy(pts, torch.zeros(2, dtype=torch.long)).tolist()
    assert abs(direct[0] - direct[1]) > 1e-5  # the test can tell the two orientations apart
    assert f[1, 3] == pytest.approx(direct[0], rel=1e-5)


def _assert_error(r, text):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddaebm: error:") and text in lines[0], r.stderr


def test_errors_are_one_line_and_write_nothing(tmp_path, cli_env):
    _assert_error(run_cli(["train", CFG, "--run-dir", "r", "loss.bogus=1"], tmp_path, cli_env), "loss.bogus")
    _assert_error(run_cli(["train", CFG, "--run-dir", "r", "train.steps=many"], tmp_path, cli_env), "train.steps")
    _assert_error(run_cli(["train", "nope.yaml", "--run-dir", "r"], tmp_path, cli_env), "nope.yaml")
    (tmp_path / "empty").mkdir()
    _assert_error(run_cli(["sample", "empty", "--num", "5", "--out", "x.npy"], tmp_path, cli_env), "no checkpoint")
    _assert_error(run_cli(["density", "missing", "--grid", "5", "--range", "0", "1", "--out", "d.npy"], tmp_path,
                          cli_env), "does not exist")
    _assert_error(run_cli(["eval", "toy", "empty"], tmp_path, cli_env), "no checkpoint")
    _assert_error(run_cli(["sample", "empty", "--num", "5", "--out", "no/such/x.npy"], tmp_path, cli_env),
                  "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    assert not any((tmp_path / "empty").iterdir())


def test_print_config(tmp_path, cli_env):
    r = run_cli(["print-config", CFG, "loss.r1_gamma=0.25"], tmp_path, cli_env)
    assert r.returncode == 0 and "r1_gamma: 0.25" in r.stdout and "dataset: 25gaussians" in r.stdout


def test_only_bad_input_is_exit_2_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """ddaebm.errors.BadInput (and its ConfigError, CheckpointError) is bad input: one line, exit 2. Any other
    exception, a ValueError from deep inside included, is a bug and propagates with its traceback (exit 1)."""
    from ddaebm import cli
    from ddaebm.errors import BadInput

    def bug(*_args, **_kwargs):
        raise ValueError("a bug deep in the code")

    monkeypatch.setattr(cli, "load_config", bug)
    with pytest.raises(ValueError, match="a bug deep"):
        cli.main(["print-config", CFG])

    def bad(*_args, **_kwargs):
        raise BadInput("train.steps must be ≥ 1")

    monkeypatch.setattr(cli, "load_config", bad)
    assert cli.main(["print-config", CFG]) == 2
    assert capsys.readouterr().err.strip() == "ddaebm: error: train.steps must be ≥ 1"
