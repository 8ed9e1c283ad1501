"""Every class of bad input, at every subcommand: one line `ddaebm: error: …` naming the key or argument, exit
status 2, and nothing written (issue 19 item 6; the random inputs of tests/test_fuzz_inputs.py come on top).

Placeholders in the argument lists: {cfg} the toy config, {new} a run dir that does not exist yet (and must not
after the call), {run} a trained tiny run (unchanged after the call), {file} a plain file, {dir} an empty folder,
{yaml:TEXT} a config file holding TEXT, {tmp} the test's folder.
"""

import shutil
import subprocess
import sys

import pytest

from tests.conftest import CONFIGS, TINY, one_process

CFG = str(CONFIGS / "toy" / "25gaussians.yaml")
TRAIN = ["train", "{cfg}", "--run-dir", "{new}", "--steps", "2", *TINY, "train.eval_at_end=false"]


def _train(*extra):
    return [*TRAIN, *extra]


CASES = [  # (arguments, text the one error line must hold)
    # zero or negative intervals and sizes
    (_train("train.ckpt_every=0"), "train.ckpt_every=0"),
    (_train("train.log_every=0"), "train.log_every=0"),
    (_train("train.snapshot_every=0"), "train.snapshot_every=0"),
    (_train("train.log_every=-5"), "train.log_every"),
    (_train("model.hidden=0"), "model.hidden=0"),
    (_train("model.nz=0"), "model.nz"),
    (_train("model.data_dim=0"), "model.data_dim"),
    (_train("model.t_emb_dim=3"), "model.t_emb_dim"),
    (_train("model.t_emb_dim=2"), "model.t_emb_dim"),
    (_train("model.nf=0"), "model.nf"),
    (_train("model.num_res_blocks=0"), "model.num_res_blocks"),
    (_train("model.ch_mult=[1,0]"), "model.ch_mult"),
    (_train("model.nice_layers=0"), "model.nice_layers"),
    (_train("data.batch=0"), "data.batch"),
    (_train("data.batch=-5"), "data.batch"),
    (_train("data.workers=-1"), "data.workers"),
    (_train("data.resolution=-1"), "data.resolution"),
    (["train", "{cfg}", "--run-dir", "{new}", "train.steps=0"], "train.steps"),
    (_train("train.keep_ckpts=-1"), "train.keep_ckpts"),
    (_train("train.max_nonfinite=-1"), "train.max_nonfinite"),
    (_train("train.threads=-1"), "train.threads"),
    (_train("diffusion.num_steps=0"), "diffusion.num_steps"),
    (_train("loss.r1_interval=0"), "loss.r1_interval"),
    (_train("sample.precise_bn_batches=-1"), "sample.precise_bn_batches"),
    (_train("eval.num_samples=0", "train.eval_at_end=true"), "eval.num_samples"),
    (_train("eval.grid=1"), "eval.grid"),
    (_train("dist.timeout_s=0"), "dist.timeout_s"),
    (_train("dist.resume_timeout_s=0"), "dist.resume_timeout_s"),
    # out-of-range rates, decays, factors
    (_train("optim.lr_g=-1"), "optim.lr_g=-1.0"),
    (_train("optim.lr_d=0"), "optim.lr_d"),
    (_train("optim.lr_g=nan"), "optim.lr_g"),
    (_train("optim.lr_d=inf"), "optim.lr_d"),
    (_train("optim.lr_min=-1"), "optim.lr_min"),
    (_train("optim.ema_decay=2"), "optim.ema_decay=2.0"),
    (_train("optim.ema_decay=-0.1"), "optim.ema_decay"),
    (_train("optim.beta1=1"), "optim.beta1"),
    (_train("optim.beta2=-0.5"), "optim.beta2"),
    (_train("optim.adam_eps=0"), "optim.adam_eps"),
    (_train("model.dropout=1"), "model.dropout"),
    (_train("model.energy_base_std=-1"), "model.energy_base_std"),
    (_train("model.logvar_min=3"), "model.logvar_min"),
    (_train("loss.r1_gamma=-1"), "loss.r1_gamma"),
    (_train("loss.nce_std=0"), "loss.nce_std"),
    (_train("loss.nce_weight=-1"), "loss.nce_weight"),
    (_train("loss.lambda_ent=-0.1"), "loss.lambda_ent"),
    (_train("loss.iw_alpha=0"), "loss.iw_alpha"),
    (_train("loss.fake_weight=-1"), "loss.fake_weight"),
    (_train("loss.recon_var_floor=-1"), "loss.recon_var_floor"),
    (_train("loss.recon_var_floor=1e300"), "loss.recon_var_floor"),
    (_train("loss.step_probs=[0,0,0,0]"), "loss.step_probs"),
    (_train("loss.r1_gamma_scale=[1,1]"), "loss.r1_gamma_scale"),
    (_train("diffusion.eps=0"), "diffusion.eps"),
    (_train("diffusion.eps=1"), "diffusion.eps"),
    (_train("diffusion.clamp_beta=0"), "diffusion.clamp_beta"),
    (_train("diffusion.variance=vp", "diffusion.beta_max=-1"), "diffusion.beta_max"),
    (_train("diffusion.variance=geometric", "diffusion.beta_max=1.5"), "diffusion.*"),
    (_train("diffusion.variances=[0.1,0.2]"), "diffusion.variances"),
    (_train("dist.grad_clip=-1"), "dist.grad_clip"),
    (_train("sample.refine_step=-1"), "sample.refine_step"),
    (_train("eval.range_lo=5"), "eval.range_lo"),
    (_train("train.seed=-1"), "train.seed"),
    (_train("train.seed=3000000000"), "train.seed"),
    # wrong types, unknown keys, choices, names
    (_train("loss.bogus=1"), "loss.bogus"),
    (_train("train.steps=many"), "train.steps"),
    (_train("model.hidden=1.5"), "model.hidden"),
    (_train("model.hidden=${nope}"), "model.hidden"),
    (_train("train.steps"), "train.steps"),
    (_train("data.batch='"), "data.batch"),
    (_train("loss.ablation=bogus"), "loss.ablation"),
    (_train("dist.zero_stage=3"), "dist.zero_stage"),
    (_train("dist.backend=mpi"), "dist.backend"),
    (_train("name="), "name"),
    (_train("name=a/b"), "name="),
    (_train("model=3"), "model"),
    # device, backend or data not available here; configs that cannot build
    (_train("dist.device=cuda"), "dist.device=cuda"),
    (_train("dist.precision=fp16"), "dist.precision=fp16"),
    (_train("dist.backend=deepspeed", "data.batch=1"), "data.batch=1"),
    (_train("data.dataset=nosuch"), "data.dataset='nosuch'"),
    (_train("model.arch=ncsnpp", "model.energy_base_std=0"), "data.dataset=25gaussians"),
    (_train("model.arch=ncsnpp"), "model.energy_base_std"),
    (_train("model.arch=ncsnpp", "model.energy_base_std=0", "data.dataset=cifar10", "data.root={tmp}/nowhere"),
     "nowhere"),
    (_train("model.arch=ncsnpp", "model.energy_base_std=0", "data.dataset=cifar10"), "data.root"),
    # command-line arguments of train
    (["train", "{cfg}", "--run-dir", "", "--steps", "2"], "--run-dir is empty"),
    (["train", "{cfg}", "--run-dir", "{file}", "--steps", "2"], "is a file"),
    (["train", "{cfg}", "--run-dir", "{file}/sub", "--steps", "2"], "is a file"),
    (_train("--slice-steps", "0"), "--slice-steps"),
    (_train("--slice-steps", "-1"), "--slice-steps"),
    (["train", "{cfg}", "--run-dir", "{new}", "--steps", "0"], "--steps"),
    (["train", "{cfg}", "--run-dir", "{new}", "--steps", "-3"], "--steps"),
    (["train", "{cfg}", "--run-dir", "{new}", "--steps", "abc"], "--steps"),
    (_train("--seed", "-1"), "--seed"),
    (_train("--resume", "{tmp}/nowhere"), "--resume"),
    (_train("--bogus"), "--bogus"),
    (_train("foo"), "foo"),
    # config files: empty, not a mapping, not YAML, not there, not a file
    (["train", "{yaml:}", "--run-dir", "{new}"], "is empty"),
    (["train", "{yaml:# only a comment\n}", "--run-dir", "{new}"], "is empty"),
    (["train", "{yaml:[1, 2]\n}", "--run-dir", "{new}"], "mapping"),
    (["train", "{yaml:7\n}", "--run-dir", "{new}"], "mapping"),
    (["train", "{yaml:train: {steps: [\n}", "--run-dir", "{new}"], "not valid YAML"),
    (["train", "{yaml:base: 3\n}", "--run-dir", "{new}"], "base"),
    (["train", "{yaml:loss: {r1_gamma: [1, 2]}\n}", "--run-dir", "{new}"], "r1_gamma"),
    (["train", "{dir}", "--run-dir", "{new}"], "not found"),
    (["train", "{tmp}/missing.yaml", "--run-dir", "{new}"], "not found"),
    (["print-config", "{yaml:}"], "is empty"),
    (["print-config", "{cfg}", "optim.ema_decay=1"], "optim.ema_decay"),
    # a trained run: what only its checkpoints can tell
    (["train", "{cfg}", "--run-dir", "{run}", "--steps", "3", *TINY, "train.eval_at_end=false"], "below step 4"),
    (["train", "{cfg}", "--run-dir", "{run}", "--steps", "8", *TINY, "loss.r1_gamma=0.5"], "different experiment"),
    (["train", "{cfg}", "--run-dir", "{run}", "--steps", "8", *TINY, "--resume", "never"], "already holds"),
    (["train", "{cfg}", "--run-dir", "{run}", "--steps", "8", *TINY, "--resume", "{file}"], "{file}"),
    # sample, density, eval: counts ≤ 0, bad ranges, bad paths
    (["sample", "{run}", "--num", "0", "--out", "{tmp}/x.npy"], "--num"),
    (["sample", "{run}", "--num", "-1", "--out", "{tmp}/x.npy"], "--num"),
    (["sample", "{run}", "--num", "abc", "--out", "{tmp}/x.npy"], "--num"),
    (["sample", "{run}", "--num", "5", "--batch", "0", "--out", "{tmp}/x.npy"], "--batch"),
    (["sample", "{run}", "--num", "5", "--seed", "-1", "--out", "{tmp}/x.npy"], "--seed"),
    (["sample", "{run}", "--num", "5", "--out", "{tmp}/missing/x.npy"], "does not exist"),
    (["sample", "{run}", "--num", "5", "--out", "{dir}.npy"], "is a folder"),
    (["sample", "{run}", "--num", "5", "--out", "{tmp}/x.txt"], ".npy"),
    (["sample", "{tmp}/nowhere", "--num", "5", "--out", "{tmp}/x.npy"], "does not exist"),
    (["sample", "{file}", "--num", "5", "--out", "{tmp}/x.npy"], "not a folder"),
    (["sample", "", "--num", "5", "--out", "{tmp}/x.npy"], "run dir"),
    (["sample", "{dir}", "--num", "5", "--out", "{tmp}/x.npy"], "no checkpoint"),
    (["sample", "{run}", "--num", "5"], "--out"),
    (["density", "{run}", "--grid", "1", "--range", "0", "1", "--out", "{tmp}/d.npy"], "--grid"),
    (["density", "{run}", "--grid", "0", "--range", "0", "1", "--out", "{tmp}/d.npy"], "--grid"),
    (["density", "{run}", "--grid", "5", "--range", "1", "0", "--out", "{tmp}/d.npy"], "--range"),
    (["density", "{run}", "--grid", "5", "--range", "nan", "1", "--out", "{tmp}/d.npy"], "--range"),
    (["density", "{run}", "--grid", "5", "--range", "-inf", "inf", "--out", "{tmp}/d.npy"], "--range"),
    (["density", "{run}", "--grid", "5", "--range", "0", "1", "--out", "{tmp}/d.npz"], ".npy"),
    (["density", "{run}", "--grid", "5", "--range", "0", "1", "--out", "{dir}.npy"], "is a folder"),
    (["density", "{tmp}/nowhere", "--grid", "5", "--range", "0", "1", "--out", "{tmp}/d.npy"], "does not exist"),
    (["eval", "toy", "{run}", "--num", "0"], "--num"),
    (["eval", "toy", "{run}", "--num", "1"], "--num"),
    (["eval", "toy", "{run}", "--grid", "0"], "--grid"),
    (["eval", "toy", "{run}", "--range", "2", "2"], "--range"),
    (["eval", "toy", "{run}", "--seed", "-5"], "--seed"),
    (["eval", "toy", "{dir}"], "no checkpoint"),
    (["eval", "fid", "{run}", "--num", "10"], "toy run"),
    (["eval", "fid", "{run}", "--num", "0"], "--num"),
    (["eval", "fid", "{run}", "--batch", "0"], "--batch"),
    (["eval", "nll", "{run}"], "eval nll"),
    (["eval", "is", "{run}", "--splits", "0"], "--splits"),
    (["eval", "bogus", "{run}"], "bogus"),
    (["bogus"], "bogus"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from ddaebm.cli import main

    run = tmp_path_factory.mktemp("bad") / "run"
    with one_process():
        assert main(["train", CFG, "--run-dir", str(run), "--steps", "4", *TINY, "train.ckpt_every=2",
                     "train.eval_at_end=false"]) == 0
    return run


def _expand(args, tmp, run):
    out = []
    for a in args:
        if a.startswith("{yaml:"):
            path = tmp / f"c{len(out)}.yaml"
            path.write_text(a[len("{yaml:"):-1])
            out.append(str(path))
            continue
        for key, value in (("cfg", CFG), ("new", tmp / "new"), ("run", run), ("file", tmp / "afile"),
                           ("dir", tmp / "adir"), ("tmp", tmp)):
            a = a.replace("{" + key + "}", str(value))
        out.append(a)
    return out


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args, text", CASES, ids=[f"{i:03d}" for i in range(len(CASES))])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, trained, capsys, args, text):
    from ddaebm.cli import main

    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir.npy").mkdir()
    args = _expand(args, tmp_path, trained)
    text = text.replace("{file}", str(tmp_path / "afile"))
    run_before, tmp_before = _files(trained), sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    try:
        with one_process():
            code = main(args)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, (args, code, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddaebm: error: ") and text in lines[0], (args, err)
    assert _files(trained) == run_before and sorted(p.name for p in tmp_path.iterdir()) == tmp_before


def test_a_subprocess_sees_the_same_one_line(tmp_path):
    """The same contract through a real interpreter (nothing printed before the line: no config, no warning)."""
    from tests.dist_utils import ds_env

    r = subprocess.run([sys.executable, "-m", "ddaebm", *_expand(_train("optim.lr_g=-1"), tmp_path, tmp_path)],
                       cwd=tmp_path, env=ds_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "optim.lr_g" in r.stderr


def test_a_checkpoint_missing_its_config_is_refused(tmp_path, trained, capsys):
    """A sealed state.pt without a 'config' entry: no traceback, one line (sample) or a fall-back (train)."""
    import hashlib
    import json

    import torch

    from ddaebm.cli import main

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for ckpt in sorted((run / "checkpoints").glob("step-*")):
        state = torch.load(ckpt / "state.pt", weights_only=True)
        del state["config"]
        torch.save(state, ckpt / "state.pt")
        data = (ckpt / "state.pt").read_bytes()
        manifest = json.loads((ckpt / "manifest.json").read_text())
        manifest["state.pt"] = [len(data), hashlib.sha256(data).hexdigest()]
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    with one_process():
        assert main(["sample", str(run), "--num", "3", "--out", str(tmp_path / "x.npy")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no 'config' entry" in err
        assert main(["train", CFG, "--run-dir", str(run), "--steps", "8", *TINY]) == 2
    assert "none of its 2 checkpoint(s) verifies" in capsys.readouterr().err
