"""Issue 21's image path at CPU scale: Fashion-MNIST and padded MNIST shards, the small networks, the small configs on
2 DeepSpeed ranks, and one evaluation row of bench/fidelity.py (FID, refined FID, OOD AUROC, StackedMNIST modes)."""

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import CONFIGS, ROOT
from tests.dist_utils import ds_env, run_ranks

FASHION = Path("/usr/share/datasets/fashion-mnist")
MNIST = ROOT.parent / "shared" / "data" / "mnist-10k"
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="/usr/share/datasets/fashion-mnist not present")
needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason="../shared/data/mnist-10k not present")
SMALL = ["fashion32", "fashion32_ncsnpp", "stackedmnist", "mnist_nice"]


def _shards(out, source: str, src, split: str, count: int, *extra: str):
    r = subprocess.run([sys.executable, "-m", "data_shards", source, "--input", str(src), "--out", str(out),
                        "--name", out.name, "--split", split,
                        "--num-samples" if source == "stackedmnist" else "--limit", str(count), *extra],
                       cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


def _idx_images(path, count):
    with gzip.open(path) as f:
        raw = f.read()
    return np.frombuffer(raw, np.uint8, offset=16)[:count * 784].reshape(count, 28, 28)


@needs_fashion
@pytest.mark.parametrize("source, src", [("fashion_mnist", FASHION), pytest.param("mnist", MNIST, marks=needs_mnist)])
def test_idx_source_padded_to_32_round_trips(tmp_path, source, src):
    from ddaebm.data.images import iterate_split, load_labels
    from ddaebm.data.pixels import to_uint8
    from ddaebm.data.shards import load_manifest

    out = _shards(tmp_path / "set", source, src, "test", 40, "--resolution", "32")
    manifest = load_manifest(out, "set", "test")
    assert (manifest["image"]["height"], manifest["image"]["width"], manifest["image"]["channels"]) == (32, 32, 1)
    assert manifest["source"]["kind"] == source and manifest["source"]["pad_to"] == 32
    images = np.concatenate([to_uint8(x, "minus_one_one")[..., 0]
                             for x, _ in iterate_split(out, "set", "test", 16, 32, 1, loader="pil", workers=0)])
    raw = _idx_images(src / "t10k-images-idx3-ubyte.gz", 40)
    assert images.shape == (40, 32, 32)
    assert np.array_equal(images[:, 2:30, 2:30], raw)  # the digits/clothes, unchanged
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert (images[:, border] == 0).all()  # a zero (black) border of 2 pixels
    with gzip.open(src / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:40]
    assert np.array_equal(load_labels(out, "set", "test"), labels)
    r = subprocess.run([sys.executable, "-m", "data_shards", source, "--input", str(src), "--out", str(tmp_path / "odd"),
                        "--split", "test", "--resolution", "31"], cwd=ROOT, env=ds_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "28+2k" in r.stderr and not (tmp_path / "odd").exists()


@pytest.mark.parametrize("head", ["residual", "scalar"])
def test_small_networks_shapes_init_and_r1(head):
    from ddaebm.config import load_config
    from ddaebm.networks import build_energy, build_generator_encoder

    cfg = load_config(CONFIGS / "small" / "stackedmnist.yaml", ["model.nf=8", f"model.energy_head={head}"])
    torch.manual_seed(0)
    energy, gen_enc = build_energy(cfg.model), build_generator_encoder(cfg.model)
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    k = torch.tensor([0, 2, 3])
    f = energy(x, k)
    assert f.shape == (3,) and f.dtype == torch.float32
    # At initialisation: −½‖x‖² (the zero output conv) for the residual head, 0 (the zero head) for the scalar one.
    expected = -0.5 * x.detach().square().sum((1, 2, 3)) if head == "residual" else torch.zeros(3)
    assert torch.allclose(f.detach(), expected)
    # R1's double backward reaches the energy's parameters once they are not at their zero init.
    with torch.no_grad():
        for p in energy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    (grad,) = torch.autograd.grad(energy(x, k).sum(), x, create_graph=True)
    grad.square().sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in energy.parameters() if p.grad is not None) > 0
    x0 = gen_enc.generator(torch.randn(3, 3, 32, 32), k, torch.randn(3, cfg.model.nz))
    assert x0.shape == (3, 3, 32, 32) and x0.abs().max() < 1
    mu, logvar = gen_enc.encoder(x0, x0, k)
    assert mu.shape == logvar.shape == (3, cfg.model.nz)


def test_small_config_checks():
    from ddaebm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="energy_head=scalar"):
        load_config(CONFIGS / "small" / "fashion32_ncsnpp.yaml", ["model.energy_head=scalar"])
    with pytest.raises(ConfigError, match="model.image_net"):
        load_config(CONFIGS / "small" / "fashion32.yaml", ["model.image_net=dcgan"])
    with pytest.raises(ConfigError, match="2 levels"):
        load_config(CONFIGS / "small" / "fashion32.yaml", ["model.ch_mult=[1]"])


@needs_fashion
@needs_mnist
@pytest.mark.parametrize("name", SMALL)
def test_small_configs_train_two_steps_on_two_deepspeed_ranks(tmp_path, name):
    pytest.importorskip("deepspeed")
    if name == "stackedmnist":
        shards = _shards(tmp_path / "stackedmnist", "stackedmnist", MNIST, "train", 32)
    elif name == "mnist_nice":  # 28² digits in logit space
        shards = _shards(tmp_path / "mnist", "mnist", MNIST, "train", 32)
    else:
        shards = _shards(tmp_path / "fashion", "fashion_mnist", FASHION, "train", 32, "--resolution", "32")
    run = tmp_path / "run"
    args = ["train", str(CONFIGS / "small" / f"{name}.yaml"), "--run-dir", str(run), "--steps", "2",
            f"data.root={shards}", f"data.dataset={shards.name}", "data.batch=8", "dist.backend=deepspeed",
            "train.log_every=1", "train.ckpt_every=2", "train.snapshot_every=2"]
    r = run_ranks(args, 2, tmp_path, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(v) for row in rows for v in row.values() if isinstance(v, float))
    assert (run / "checkpoints" / "latest").exists() and (run / "snapshots" / "fakes-000000002.png").is_file()


def _tiny_extractor(path):
    """A TorchScript stand-in for the Inception weights ([N, 3, 299, 299] → [N, 32]): the FID code path, fast."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 8, stride=8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    torch.jit.save(torch.jit.script(net), str(path))
    return path


def _finite(value) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return math.isfinite(value)
    return True


@needs_mnist
def test_fidelity_evaluation_row_on_a_tiny_run(tmp_path):
    """A StackedMNIST run trained 3 steps by bench/fidelity.py: one row with FID, refined FID, AUROC against MNIST,
    noise and constant images, and modes, every number finite; then --plot draws it."""
    data = _shards(tmp_path / "stackedmnist", "stackedmnist", MNIST, "train", 64)
    _shards(tmp_path / "stackedmnist", "stackedmnist", MNIST, "test", 40, "--seed", "1")
    mnist = tmp_path / "mnist"
    for split, n in (("train", 300), ("test", 100)):
        _shards(mnist, "mnist", MNIST, split, n)
    run = tmp_path / "run"
    cmd = [sys.executable, "bench/fidelity.py", str(CONFIGS / "small" / "stackedmnist.yaml"), "--run-dir", str(run),
           "--minutes", "0.02", "--no-eval-at-start", "--num", "12", "--refine-num", "6", "--ood-num", "30",
           "--ood", f"{tmp_path / 'stackedmnist'}:stackedmnist:train", "--modes-mnist", f"{mnist}:mnist",
           "--modes-num", "20", "--modes-p", "uniform", "--classifier-epochs", "1", "--eval-batch", "8",
           "--cache", str(tmp_path / "cache"),
           "--inception", str(_tiny_extractor(tmp_path / "features.pt")), f"data.root={data}", "data.batch=4",
           "model.nf=8", "train.steps=3"]
    r = subprocess.run(cmd, cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "fidelity.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert row["step"] >= 1 and row["num"] == 12 and row["refine_num"] == 6 and row["ref_num"] == 40
    assert set(row["auroc"]) == {"stackedmnist", "uniform", "constant"} and row["num_in"] == 30
    for key in ("fid", "fid_refine", "fid_refine_base", "modes", "kl", "kl_dependence", "train_minutes", "s_per_it"):
        assert row[key] is not None, key
    assert _finite(row), row
    assert (run / "fidelity" / f"grid-{row['step']:09d}.png").is_file()
    # --eval-only: one more row of the same checkpoint, no training (the final large-sample FID of a long run).
    r = subprocess.run(cmd + ["--eval-only", "--no-synthetic"], cwd=ROOT, env=ds_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "fidelity.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["eval_only"] and rows[1]["step"] == row["step"]
    assert set(rows[1]["auroc"]) == {"stackedmnist"}
    # bench/fidelity_probe.py: one finite row per step k, with the encoder's columns (the full model has one).
    r = subprocess.run([sys.executable, "bench/fidelity_probe.py", str(run), "--num", "6", "--split", "train",
                        "--ood", f"{tmp_path / 'stackedmnist'}:stackedmnist:test", "--fid-from",
                        "--refine-sweep", "0,0.01", "--fid-num", "6",
                        "--inception", str(tmp_path / "features.pt"), "--cache", str(tmp_path / "cache"),
                        "--out", str(tmp_path / "probe.jsonl")],
                       cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    *probe, complexity, fid_from, sweep = [json.loads(line) for line in
                                           (tmp_path / "probe.jsonl").read_text().splitlines()]
    # FID of real images regenerated from each step s = 0 (the images themselves) … T, against the test split.
    assert list(fid_from["fid_from"]) == ["0", "1", "2", "3", "4"] and fid_from["num"] == 6
    assert _finite(fid_from) and fid_from["ref_num"] == 40
    # The plain sampler's samples refined by each step size (0: unrefined).
    assert list(sweep["fid_refined"]) == ["0.0", "0.01"] and sweep["num"] == 6 and _finite(sweep)
    assert _finite(complexity) and all(0 <= complexity[key] <= 1 for key in ("auc_f", "auc_minus_ink", "auc_minus_png"))
    assert -1 <= complexity["spearman_f_png"] <= 1
    assert 1 <= len(complexity["auc_f_in_class"]) <= 6 and 1 <= len(complexity["auc_f_out_class"]) <= 6
    assert [p["k"] for p in probe] == [0, 1, 2, 3] and all(p["step"] == row["step"] for p in probe)
    assert all(_finite(p) and 0 <= p["auc_f"] <= 1 and p["kl_post"] >= 0 and p["z_spread"] > 0 for p in probe)
    # --floor: the same measurements on real training images (no model), drawn by --plot as horizontal lines.
    floor_dir = tmp_path / "floor"
    floor_cmd = [c for c in cmd if c not in ("--no-eval-at-start",)]
    floor_cmd[floor_cmd.index("--run-dir") + 1] = str(floor_dir)
    r = subprocess.run(floor_cmd + ["--floor"], cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (floor,) = [json.loads(line) for line in (floor_dir / "floor.jsonl").read_text().splitlines()]
    assert floor["floor"] and set(floor["fid"]) == {"12"} and floor["ref_num"] == 40 and floor["modes_num"] == 20
    assert _finite(floor) and 0 <= floor["fid"]["12"] < row["fid"]  # real digits sit closer than 3-step samples
    assert 1 <= floor["modes"] <= 20 and not (floor_dir / "checkpoints").exists()
    r = subprocess.run([sys.executable, "bench/fidelity.py", "--plot", str(tmp_path / "curves.png"), str(run),
                        str(floor_dir)], cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "curves-grids.png").is_file()
    # --table: the run judged by its --eval-only row, the floor as "real data".
    r = subprocess.run([sys.executable, "bench/fidelity.py", "--table", str(run), str(floor_dir)], cwd=ROOT,
                       env=ds_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    head, rule, run_line, floor_line = r.stdout.strip().splitlines()
    assert "AUROC vs stackedmnist" in head and "modes" in head and rule.count("---") == head.count("|") - 1
    final = rows[1]
    assert run_line.startswith(f"| full | {final['step']} |") and f"{final['fid']:.1f} (12)" in run_line
    assert f"{final['fid_refine']:.1f} (6, s = 0.001); unrefined {final['fid_refine_base']:.1f}" in run_line
    assert f"{final['auroc']['stackedmnist']:.3f}" in run_line and f"| {final['modes']} |" in run_line
    assert floor_line.startswith("| real data |") and f"{floor['fid']['12']:.1f} (12)" in floor_line


@needs_mnist
def test_a_stop_signal_ends_a_fidelity_run_with_its_checkpoint_and_its_minutes(tmp_path, monkeypatch, capsys):
    """SIGTERM in the middle of a training slice: the iteration finishes, the checkpoint and the training minutes
    are kept, one line says so and the exit status is 143 (as `ddaebm train`), not a traceback."""
    import os
    import signal

    import bench.fidelity as fidelity
    from ddaebm.training.trainer import Trainer

    data = _shards(tmp_path / "stackedmnist", "stackedmnist", MNIST, "train", 32)
    real_step, calls = Trainer.train_step, []

    def signal_in_the_second(self, *args, **kwargs):
        calls.append(self.step)
        if len(calls) == 2:  # a scheduler's SIGTERM arrives during the second iteration
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", signal_in_the_second)
    run = tmp_path / "run"
    code = fidelity.main([str(CONFIGS / "small" / "stackedmnist.yaml"), "--run-dir", str(run), "--minutes", "5",
                          "--no-eval-at-start", "--num", "0", "--no-synthetic", f"data.root={data}", "data.batch=4",
                          "model.nf=8", "train.steps=50", "data.loader=pil", "data.workers=0"])
    assert code == 143 and len(calls) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fidelity: stopped by a signal at step 2,") and "Traceback" not in "\n".join(err)
    state = json.loads((run / fidelity.STATE).read_text())
    assert state["step"] == 2 and state["train_seconds"] > 0 and state["last_eval"] is None
    assert (run / "checkpoints").is_dir() and not (run / "fidelity.jsonl").exists()


class _Flat(torch.nn.Module):
    """A network on images seen through flat vectors: the 2-D (toy) shape of every tensor the losses handle."""

    def __init__(self, net, shape):
        super().__init__()
        self.net, self.shape = net, shape

    def forward(self, x, k, *rest):
        out = self.net(x.view(-1, *self.shape), k, *rest)
        return out if out.dim() == 1 else out.flatten(1)


class _FlatEncoder(_Flat):
    def forward(self, x_k, x_k1, k):
        return self.net(x_k.view(-1, *self.shape), x_k1.view(-1, *self.shape), k)


@pytest.mark.parametrize("ablation", ["full", "no_latent", "kl_only", "kl_no_entropy"])
def test_image_losses_equal_their_flat_form(ablation):
    """Every term of both objectives on [B, C, H, W] images equals the same term on the same pixels as flat rows
    (the toy path's shape): the schedule's broadcasting, the posterior, log N(x_{k+1}; a·x_k, σ²), R1 with the
    transition score, the recon variance and the encoder terms agree, values and gradients."""
    from ddaebm.config import load_config
    from ddaebm.diffusion.schedule import build_schedule
    from ddaebm.losses import ABLATIONS, draw_step_batch, energy_loss, generator_loss
    from ddaebm.networks import GeneratorEncoder, build_energy, build_generator_encoder

    cfg = load_config(CONFIGS / "small" / "fashion32.yaml", ["model.nf=8", f"loss.ablation={ablation}"])
    terms, s = ABLATIONS[ablation], build_schedule(cfg.diffusion)
    torch.manual_seed(0)
    energy, gen_enc = build_energy(cfg.model), build_generator_encoder(cfg.model, terms.encoder)
    with torch.no_grad():  # away from the zero output convs, so that every term and gradient is non-trivial
        for p in [*energy.parameters(), *gen_enc.parameters()]:
            p.add_(0.02 * torch.randn_like(p))
    shape = (1, 32, 32)
    flat_gen_enc = GeneratorEncoder(_Flat(gen_enc.generator, shape),
                                    _FlatEncoder(gen_enc.encoder, shape) if terms.encoder else None)
    x0 = torch.rand(6, *shape) * 2 - 1
    results = []
    for e, ge, data in ((energy, gen_enc, x0), (_Flat(energy, shape), flat_gen_enc, x0.flatten(1))):
        b = draw_step_batch(data, s, ge.generator, terms, cfg.model.nz, torch.Generator().manual_seed(3))
        loss_d, stats_d = energy_loss(e, s, b, cfg.loss)
        grads_d = torch.autograd.grad(loss_d, list(energy.parameters()))
        loss_g, stats_g = generator_loss(e, ge, s, b, cfg.loss, terms)
        grads_g = torch.autograd.grad(loss_g, list(gen_enc.parameters()), allow_unused=True)
        results.append(({**stats_d, **stats_g}, grads_d, grads_g))
    (stats_img, gd_img, gg_img), (stats_flat, gd_flat, gg_flat) = results
    assert stats_img.keys() == stats_flat.keys()
    for key in stats_img:
        assert torch.allclose(stats_img[key], stats_flat[key], rtol=1e-5, atol=1e-4), key
    for a, b in zip([*gd_img, *gg_img], [*gd_flat, *gg_flat]):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_probe_per_class_auroc():
    from bench.fidelity_probe import by_class

    # In-distribution classes 0 (scores 5, 6) and 1 (scores 1, 2) against out-of-distribution scores 3 and 4:
    # class 0 is above both (AUROC 1), class 1 below both (0).
    f_in, y_in = torch.tensor([5.0, 1.0, 6.0, 2.0]), torch.tensor([0, 1, 0, 1])
    f_out = torch.tensor([3.0, 4.0])
    assert by_class(f_in, y_in, f_out, in_first=True) == {"0": 1.0, "1": 0.0}
    # Out-of-distribution class 7 (score 3) sits above half of the in-distribution set, class 8 (score 9) above all.
    assert by_class(torch.tensor([3.0, 9.0]), torch.tensor([7, 8]), f_in, in_first=False) == {"7": 0.5, "8": 0.0}
    assert by_class(torch.arange(21.0), torch.arange(21), f_out, in_first=True) is None  # too many labels


def test_curves_draw_the_panels_their_rows_measured(tmp_path):
    """--plot: a StackedMNIST run that measured modes and KL only gets those two panels (FID and AUROC axes would
    be empty); a Fashion run FID and AUROC; a floor's figures count too."""
    from bench.fidelity_report import panels, plot

    smnist = [{"step": s, "train_minutes": m, "modes": n, "kl": kl, "fid": None, "auroc": {}}
              for s, m, n, kl in ((768, 20, 230, 4.5), (1527, 40, 786, 1.1))]
    fashion = [{"step": 500, "train_minutes": 20, "fid": 300.0, "auroc": {"mnist": 0.9}}]
    assert panels([smnist]) == ["modes", "kl"]
    assert panels([fashion]) == ["fid", "auroc"]
    assert panels([smnist], [{"floor": True, "fid": {"1000": 14.9}}]) == ["fid", "modes", "kl"]
    assert panels([fashion, smnist]) == ["fid", "auroc", "modes", "kl"]
    for name, rows in (("smnist", smnist), ("fashion", fashion)):
        run = tmp_path / name
        run.mkdir()
        (run / "fidelity.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    floor = tmp_path / "floor"
    floor.mkdir()
    (floor / "floor.jsonl").write_text(json.dumps({"floor": True, "modes": 1000, "kl": 0.011}) + "\n")
    plot(tmp_path / "curves.png", [tmp_path / "smnist", floor], None)
    from PIL import Image

    assert Image.open(tmp_path / "curves.png").size == (1100, 440)  # two 5-inch panels at 110 dpi
    assert (tmp_path / "curves-grids.png").is_file()
