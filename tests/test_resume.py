"""Resume equivalence: N steps, stop, resume, M steps gives bit-identical state to N+M uninterrupted."""

import pytest
import torch

from ddaebm.config import ConfigError, load_config
from ddaebm.errors import BadInput
from ddaebm.checkpoint import complete_checkpoints, latest_checkpoint
from ddaebm.training.loop import prepare_run, train
from tests.conftest import CONFIGS, TINY

BASE = TINY + ["train.eval_at_end=false", "train.ckpt_every=4"]


def _cfg(steps, extra=()):
    return load_config(CONFIGS / "toy" / "25gaussians.yaml", BASE + [f"train.steps={steps}", *extra])


def _flat(state, prefix=""):
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            out[prefix + str(key)] = value
    return out


def _assert_identical(a, b):
    fa, fb = _flat(a.state_dict()), _flat(b.state_dict())
    assert fa.keys() == fb.keys()
    for key in fa:
        assert torch.equal(fa[key], fb[key]), key


@pytest.mark.parametrize("extra", [(), ("optim.ema_decay=0.9", "loss.r1_interval=3", "optim.lr_schedule=cosine",
                                       "loss.ablation=kl_only")])
def test_resume_is_bit_identical(tmp_path, extra):
    ref = train(_cfg(12, extra), tmp_path / "ref")
    first = train(_cfg(12, extra), tmp_path / "split", slice_steps=8)
    assert first.step == 8
    cfg = _cfg(12, extra)
    state = prepare_run(cfg, tmp_path / "split", "auto")
    assert state["step"] == 8
    resumed = train(cfg, tmp_path / "split", state)
    assert resumed.step == 12
    _assert_identical(ref, resumed)


def test_slices_of_a_live_trainer_announce_once(tmp_path, capsys):
    """The start-up lines come with the call that builds (or loads) the trainer, not with every later slice."""
    trainer = train(_cfg(6), tmp_path / "run", slice_steps=2)
    for _ in range(2):
        train(_cfg(6), tmp_path / "run", trainer=trainer, slice_steps=2)
    train(_cfg(6), tmp_path / "run", trainer=trainer, announce=True)
    out = capsys.readouterr().out
    assert trainer.step == 6
    assert out.count("starting step 0/6") == 1 and out.count("resumed at step") == 1
    assert out.count("parameters: ") == 2


def test_checkpoints_pointer_and_pruning(tmp_path):
    train(_cfg(20, ["train.keep_ckpts=2"]), tmp_path / "run")
    names = [p.name for p in complete_checkpoints(tmp_path / "run")]
    assert names == ["step-000000016", "step-000000020"]
    assert latest_checkpoint(tmp_path / "run").name == "step-000000020"
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp*"))


def test_resume_refuses_a_different_experiment(tmp_path):
    train(_cfg(4), tmp_path / "run")
    with pytest.raises(ConfigError, match="loss.r1_gamma"):
        prepare_run(_cfg(8, ["loss.r1_gamma=0.5"]), tmp_path / "run", "auto")
    with pytest.raises(BadInput, match="already holds checkpoints"):
        prepare_run(_cfg(8), tmp_path / "run", "never")


def test_incomplete_checkpoint_is_ignored(tmp_path):
    """A save killed before its rename leaves only a temp folder: resume uses the last complete one."""
    train(_cfg(8), tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    (root / ".step-000000012.tmp999").mkdir()
    (root / ".step-000000012.tmp999" / "state.pt").write_bytes(b"partial")
    (root / "latest").unlink()  # killed between rename and pointer update, worst case
    assert latest_checkpoint(tmp_path / "run").name == "step-000000008"
