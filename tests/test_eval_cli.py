"""`ddaebm eval fid|is|ood|modes|nll` end to end on tiny trained runs: rows in metric-*.jsonl, the same FID on one
and two ranks, the NICE likelihood against a direct computation, and one-line errors that write nothing."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import CONFIGS, ROOT, TINY
from tests.dist_utils import ds_env, run_ranks

MNIST = ROOT.parent / "shared" / "data" / "mnist-10k"
pytestmark = pytest.mark.skipif(not MNIST.is_dir(), reason="../shared/data/mnist-10k not present")


def _cli(args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "ddaebm", *args], cwd=cwd, env=ds_env(), capture_output=True,
                          text=True, timeout=timeout)


def _main(args, capsys):
    """The CLI in this process (saves the ~3 s of a fresh interpreter per call): (exit status, stdout, stderr)."""
    from ddaebm.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def _ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _rows(run, name):
    path = run / f"metric-{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _shards(out, source, split, count):
    flag = "--num-samples" if source == "stackedmnist" else "--limit"
    subprocess.run([sys.executable, "-m", "data_shards", source, "--input", str(MNIST), "--out", str(out), "--name",
                    source, "--split", split, flag, str(count)], cwd=ROOT, env=ds_env(), check=True,
                   capture_output=True, timeout=300)


class _TinyFeatures(torch.nn.Module):
    """A stand-in for Inception with its input convention: [N, 3, 299, 299] → 16 features."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 5, stride=4)

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 2).flatten(1)


class _TinyLogits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(48, 1008)

    def forward(self, x):
        return 20 * self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Shards and three tiny runs: NCSN++ on StackedMNIST, MNIST NICE, and a toy run (2 steps each)."""
    d = tmp_path_factory.mktemp("eval")
    _shards(d / "sm", "stackedmnist", "train", 64)
    _shards(d / "sm", "stackedmnist", "test", 32)
    _shards(d / "mn", "mnist", "train", 512)
    _shards(d / "mn", "mnist", "test", 128)
    common = ["--steps", "2", "train.ckpt_every=2", "train.snapshot_every=100", "train.eval_at_end=false",
              "data.loader=pil"]
    jobs = [["train", CONFIGS / "tiny" / "cifar10.yaml", "--run-dir", d / "img", *common, "data.dataset=stackedmnist",
             f"data.root={d / 'sm'}"],
            ["train", CONFIGS / "tiny" / "mnist_nice.yaml", "--run-dir", d / "nice", *common, f"data.root={d / 'mn'}"],
            ["train", CONFIGS / "toy" / "25gaussians.yaml", "--run-dir", d / "toy", "--steps", "2", *TINY,
             "train.eval_at_end=false"]]
    procs = [subprocess.Popen([sys.executable, "-m", "ddaebm", *map(str, job)], cwd=d, env=ds_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for job in jobs]
    for p in procs:  # three interpreters at once: their start-up overlaps
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    torch.manual_seed(0)
    with warnings.catch_warnings():  # TorchScript is deprecated in torch ≥ 2.10, yet it is the weights' format
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(_TinyFeatures()), str(d / "features.pt"))
        torch.jit.save(torch.jit.script(_TinyLogits()), str(d / "logits.pt"))
    return d


def test_fid_is_ood_modes_rows(runs, capsys):
    d, run = runs, runs / "img"
    r = _ok(_main(["eval", "fid", run, "--num", "16", "--ref-num", "16", "--batch", "8", "--cache", d / "cache"],
                  capsys))
    (row,) = _rows(run, "fid")
    assert row["step"] == 2 and row["num_samples"] == 16 and row["ref_num"] == 16 and not row["ref_cached"]
    assert np.isfinite(row["fid"]) and row["fid"] > 0 and row["extractor"].startswith("default_1-")
    assert (d / "cache").is_dir() and row["ref_cache"].startswith(str(d / "cache")) and "fid" in r.stdout
    assert row["refine"] is None and row["use_ema"]

    _ok(_main(["eval", "is", run, "--num", "20", "--splits", "4", "--inception-logits", d / "logits.pt",
               "--refine-step", "0.02"], capsys))
    (row,) = _rows(run, "is")
    assert 1.0 <= row["is"] <= 1008 and row["classes"] == 1008 and row["splits"] == 4
    assert row["refine"] == 0.02  # --refine-step refines, with that step size, and the row says which

    _ok(_main(["eval", "ood", run, "--in", f"{d / 'sm'}:stackedmnist:test", "--ood", f"{d / 'mn'}:mnist:test",
               "--num", "24"], capsys))
    (row,) = _rows(run, "ood")
    assert row["num_in"] == 24 and 0 <= row["ood"]["mnist:test"]["auroc"] <= 1 and row["energy_ema"]

    _ok(_main(["eval", "modes", run, "--mnist", f"{d / 'mn'}:mnist", "--num", "12", "--classifier-epochs", "1",
               "--classifier-cache", d / "clf", "--p", "uniform"], capsys))
    (row,) = _rows(run, "modes")
    assert 1 <= row["modes"] <= 12 and np.isfinite(row["kl"]) and 0 <= row["classifier_test_accuracy"] <= 1
    assert len(row["kl_channels"]) == 3 and row["kl_dependence"] >= 0  # where the KL comes from
    assert len(list((d / "clf").glob("*.json"))) == 1


def test_fid_same_on_one_and_two_ranks(runs):
    """Per-sample seeds and summed moments: 2 ranks give the FID of 1 (here with a stand-in feature network). The
    reference is computed on both (separate caches); with --ref-num 32 of 64 images rank 1 reads none of it."""
    d, run = runs, runs / "img"
    args = ["eval", "fid", str(run), "--num-samples", "16", "--batch", "8", "--ref-num", "32", "--inception",
            str(d / "features.pt")]
    _ok(run_ranks([*args, "--cache", str(d / "cache-2")], 2, d))
    _ok(run_ranks([*args, "--cache", str(d / "cache-1")], 1, d))
    rows = [r for r in _rows(run, "fid") if r["extractor"].startswith("features-")]
    assert [r["world"] for r in rows] == [2, 1] and not any(r["ref_cached"] for r in rows)
    assert rows[0]["fid"] == pytest.approx(rows[1]["fid"], rel=1e-9)


def test_nll_on_a_tiny_nice_run(runs, capsys):
    from ddaebm.data.images import iterate_split
    from ddaebm.model import Model

    d, run = runs, runs / "nice"
    _ok(_main(["eval", "nll", run, "--num", "100", "--batch", "32", "--seed", "3", "--exact-num", "16"], capsys))
    (row,) = _rows(run, "nll")
    assert row["num"] == 100 and (run / "exact.png").is_file()
    model = Model.from_run(run)
    x = torch.cat([b for b, _ in iterate_split(d / "mn", "mnist", "test", 128, 28, 1, "logit", "pil", 0, seed=3)])
    with torch.no_grad():
        f = model.energy(x[:100], torch.zeros(100, dtype=torch.long)).double()
    assert row["ll_logit_nats"] == pytest.approx(f.mean().item(), rel=1e-6)
    assert row["bpd_logit"] == pytest.approx(-row["ll_logit_nats"] / (784 * np.log(2)))
    assert row["ll_pixel_nats"] > row["ll_logit_nats"]  # the logit map stretches (0, 1): its Jacobian is > 1


def _error(r, text):
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddaebm: error:") and text in lines[0], r.stderr


def test_errors_are_one_line_and_write_nothing(runs, capsys):
    d = runs
    (d / "empty").mkdir(exist_ok=True)
    before = {p: p.read_text() for p in d.glob("*/metric-*.jsonl")}
    _error(_cli(["eval", "fid", str(d / "toy"), "--num", "4"], d), "toy run")  # one in a real process
    _error(_main(["eval", "fid", d / "empty"], capsys), "no checkpoint")
    _error(_main(["eval", "fid", d / "img", "--num", "4", "--ref", f"{d / 'sm'}:stackedmnist:valid"], capsys),
           "no manifest")
    _error(_main(["eval", "nll", d / "img"], capsys), "NICE")
    _error(_main(["eval", "is", d / "img", "--num", "10"], capsys), "--inception-logits")
    _error(_main(["eval", "ood", d / "img", "--ood", d / "missing:x:test"], capsys), "does not exist")
    _error(_main(["eval", "modes", d / "nice", "--mnist", f"{d / 'mn'}:mnist"], capsys), "3-channel")
    _error(_main(["eval", "ood", d / "img", "--ood", "nocolons"], capsys), "ROOT:NAME:SPLIT")
    assert {p: p.read_text() for p in d.glob("*/metric-*.jsonl")} == before
    assert not (d / "toy" / "metric-fid.jsonl").exists() and not (d / "img" / "exact.png").exists()
