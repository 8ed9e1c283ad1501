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
    (["loss.nce_weight=-1"], "loss.nce_weight=-1.0: must be ≥ 0"),
    (["loss.nce_std=0"], "loss.nce_std=0.0: must be > 0"),
    (["model.energy_base_std=-1"], "model.energy_base_std=-1.0: must be ≥ 0"),
    (["model.arch=mnist_nice", "model.energy_base_std=1"], "0 unless model.arch=toy")])
def test_nce_and_base_settings_are_checked(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIGS / "toy" / "25gaussians.yaml", override)


def _numeric_fields(cls, prefix=""):
    """Dotted keys of the schema's int/float fields and lists of them (the dataclass tree of Config)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _numeric_fields(hint, f"{prefix}{f.name}.")
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        inner = [typing.get_args(a)[0] if typing.get_origin(a) is list else a for a in args]
        if any(t in (int, float) for t in inner):
            yield prefix + f.name


def test_every_number_in_the_schema_has_a_range():
    """ddaebm/config/ranges.py covers every numeric field (a new field without a range fails here), and nothing
    else."""
    from ddaebm.config import Config
    from ddaebm.config.ranges import RANGES

    fields = set(_numeric_fields(Config))
    assert fields - set(RANGES) == set(), "add a range in ddaebm/config/ranges.py"
    assert set(RANGES) - fields == set()
    load_config(None)  # the schema's defaults are in range
    for name in ("25gaussians", "pinwheel"):
        load_config(CONFIGS / "toy" / f"{name}.yaml")


@pytest.mark.parametrize("override, match", [
    ("train.ckpt_every=0", "train.ckpt_every=0: must be ≥ 1"),
    ("train.log_every=-3", "train.log_every"),
    ("train.snapshot_every=0", "train.snapshot_every"),
    ("model.hidden=0", "model.hidden"),
    ("model.t_emb_dim=7", "multiple of 2"),
    ("optim.lr_g=-1", "optim.lr_g=-1.0: must be > 0"),
    ("optim.lr_d=nan", "optim.lr_d"),
    ("optim.lr_d=inf", "optim.lr_d"),
    ("optim.ema_decay=2", "optim.ema_decay=2.0: must be in [0, 1)"),
    ("optim.beta2=1", "optim.beta2"),
    ("train.keep_ckpts=-1", "train.keep_ckpts"),
    ("train.seed=-1", "train.seed"),
    ("eval.num_samples=0", "eval.num_samples"),
    ("eval.range_lo=9", "eval.range_lo"),
    ("model.logvar_min=5", "model.logvar_min"),
    ("model.ch_mult=[1,0,2]", "model.ch_mult"),
    ("dist.timeout_s=0", "dist.timeout_s"),
    ("name=a/b", "name="),
    ("train.steps=${nowhere}", "train.steps"),
])
def test_values_out_of_range_name_the_key(override, match):
    import re

    with pytest.raises(ConfigError, match=re.escape(match)):
        load_config(CONFIGS / "toy" / "25gaussians.yaml", [override])


@pytest.mark.parametrize("text, match", [("", "is empty"), ("# nothing\n", "is empty"), ("[1, 2]\n", "mapping"),
                                         ("42\n", "mapping"), ("base: [1]\n", "base"), ("a: [\n", "not valid YAML")])
def test_empty_or_non_mapping_yaml_is_refused(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)
