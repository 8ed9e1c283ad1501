"""Config loading: typed schema, base chains, overrides, and errors that name the key at fault."""

import pytest

from ddaebm.config import ConfigError, config_from_dict, experiment_differences, load_config, to_dict
from ddaebm.diffusion.schedule import build_schedule
from tests.conftest import CONFIGS


def test_toy_configs_load_and_name_after_file():
    for name in ("25gaussians", "pinwheel", "swissroll", "8gaussians", "checkerboard", "2spirals", "rings",
                 "moons", "circles"):
        cfg = load_config(CONFIGS / "toy" / f"{name}.yaml")
        assert cfg.name == name and cfg.data.dataset == name
        # The toy schedule ends at noise (method.md §1.7): the sampler's N(0, I) start matches x_T.
        assert build_schedule(cfg.diffusion).alpha_bar[-1] < 1e-3


def test_overrides_win_and_keep_types():
    cfg = load_config(CONFIGS / "toy" / "25gaussians.yaml", ["loss.r1_gamma=0.5", "train.steps=7",
                                                              "diffusion.clamp_beta=0.99"])
    assert cfg.loss.r1_gamma == 0.5 and isinstance(cfg.loss.r1_gamma, float)
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.diffusion.clamp_beta == 0.99


@pytest.mark.parametrize("override, names", [
    ("loss.nope=1", "loss.nope"),
    ("train.steps=abc", "train.steps"),
    ("loss.ablation=bogus", "loss.ablation"),
    ("diffusion.grid=linear", "diffusion.grid"),
    ("data.batch=0", "data.batch"),
    ("train.steps", "key=value"),
    ("loss.r1_gamma_scale=[0.1,0.1]", "loss.r1_gamma_scale"),
    ("loss.r1_gamma_scale=[0.1,0.1,-1,0.1]", "loss.r1_gamma_scale"),
    ("loss.step_probs=[1,1,1]", "loss.step_probs"),
    ("loss.step_probs=[1,-1,1,1]", "loss.step_probs"),
    ("loss.step_probs=[0,0,0,0]", "loss.step_probs"),
    ("sample.precise_bn_batches=-1", "sample.precise_bn_batches"),
])
def test_bad_overrides_name_the_key(override, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(CONFIGS / "toy" / "25gaussians.yaml", [override])


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: {r1_gamma: [1, 2]}\n")
    with pytest.raises(ConfigError, match="r1_gamma"):
        load_config(bad)
    cyc = tmp_path / "cyc.yaml"
    cyc.write_text("base: cyc.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(cyc)


def test_round_trip_and_experiment_differences():
    cfg = load_config(CONFIGS / "toy" / "pinwheel.yaml")
    assert config_from_dict(to_dict(cfg)) == cfg
    longer = load_config(CONFIGS / "toy" / "pinwheel.yaml", ["train.steps=99999", "eval.grid=50"])
    assert experiment_differences(to_dict(cfg), longer) == []
    other = load_config(CONFIGS / "toy" / "pinwheel.yaml", ["loss.r1_gamma=0.1"])
    assert [d.split(":")[0] for d in experiment_differences(to_dict(cfg), other)] == ["loss.r1_gamma"]


@pytest.mark.parametrize("values, match", [("[1e-4,0.1,0.4,0.8]", "5 values"), ("[1e-4,0.5,0.4,0.8,0.9]", "increase")])
def test_explicit_variances_are_checked(values, match):
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIGS / "toy" / "25gaussians.yaml",
                    ["diffusion.variance=explicit", f"diffusion.variances={values}"])


@pytest.mark.parametrize("override, match", [
    (["loss.nce_weight=-1"], "loss.nce_weight must be ≥ 0 and loss.nce_std > 0"),
    (["loss.nce_std=0"], "loss.nce_weight must be ≥ 0 and loss.nce_std > 0"),
    (["model.energy_base_std=-1"], "model.energy_base_std must be ≥ 0"),
    (["model.arch=mnist_nice", "model.energy_base_std=1"], "0 unless model.arch=toy")])
def test_nce_and_base_settings_are_checked(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIGS / "toy" / "25gaussians.yaml", override)
