"""fastpath.select: the toy fast path is chosen once, from the config, and every config field is accounted for.

A field of the loss, model or diffusion config that is neither implemented by the fast path (HANDLED) nor
makes it decline (REQUIRES) fails here, so a new loss term cannot be silently dropped on toy runs.
"""

import dataclasses

import pytest

from ddaebm import fastpath
from ddaebm.config import DiffusionConfig, LossConfig, ModelConfig, load_config
from ddaebm.losses import GENERIC
from tests.conftest import CONFIGS

SECTIONS = {"diffusion": DiffusionConfig, "loss": LossConfig, "model": ModelConfig}


@pytest.mark.parametrize("section", list(SECTIONS))
def test_every_field_is_handled_or_declines(section):
    fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
    handled = fastpath.HANDLED[section]
    requires = {key.split(".")[1] for key in fastpath.REQUIRES if key.startswith(section + ".")}
    unaccounted = fields - handled - requires
    assert not unaccounted, f"{section} fields neither handled by ddaebm/fastpath nor declining it: {unaccounted}"
    assert not handled & requires
    assert not (handled - fields), f"HANDLED names fields that no longer exist: {handled - fields}"


def _toy(*overrides):
    return load_config(CONFIGS / "toy" / "25gaussians.yaml", list(overrides))


def test_toy_configs_take_the_fast_path():
    objectives, note = fastpath.select(_toy())
    assert objectives.name == "toy fast path" and "fast path" in note


@pytest.mark.parametrize("override, key", [
    ("loss.ablation=no_latent", "loss.ablation"), ("loss.ablation=kl_only", "loss.ablation"),
    ("loss.recon_mode=mse_prior_z", "loss.recon_mode"), ("dist.precision=bf16", "dist.precision"),
    ("train.fast_path=generic", "train.fast_path")])
def test_a_value_it_lacks_makes_it_decline_and_says_which(override, key):
    objectives, note = fastpath.select(_toy(override))
    assert objectives is GENERIC and key in note


def test_every_requirement_declines_on_another_value():
    """Each REQUIRES key: some other allowed value exists and declines (the check reads the right field)."""
    from ddaebm.config import CHOICES

    for key, allowed in fastpath.REQUIRES.items():
        others = [v for v in CHOICES[key] if v not in allowed]
        assert others, key
        section, name = key.split(".")
        cfg = _toy()
        setattr(getattr(cfg, section), name, others[0])
        assert fastpath.declined(cfg) == f"{key}={others[0]}"


def test_image_configs_take_the_generic_path():
    cfg = load_config(CONFIGS / "tiny" / "cifar10.yaml", ["data.root=unused"])
    objectives, note = fastpath.select(cfg)
    assert objectives is GENERIC and "model.arch=ncsnpp" in note
