"""The typed configuration: one schema, YAML files merged on it, CLI dotlist overrides merged last.

Every field has a type and a default; an unknown key or a value of the wrong type fails with the key's
name (OmegaConf structured configs). A YAML file may name another as `base:` (a path relative to itself),
so dataset configs share one toy base. The resolved config is printed at start and saved in the run dir.
The schema, a docstring under every field, is ddaebm/config/schema.py; loading and the value checks are here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ddaebm.config.schema import (Config, DataConfig, DiffusionConfig, DistConfig, EvalConfig, LossConfig,  # noqa: F401
                                  ModelConfig, OptimConfig, SampleConfig, TrainConfig)
from ddaebm.config.ranges import RANGES
from ddaebm.errors import BadInput


class ConfigError(BadInput):
    """A config that cannot be used; the message names the file or key at fault."""


# Values a key may take where the type alone does not say it (checked after merging).
CHOICES = {
    "diffusion.grid": ("eps", "drl"),
    "diffusion.variance": ("vp", "geometric", "explicit"),
    "diffusion.first_beta": ("var_t0", "ddgan"),
    "model.arch": ("toy", "ncsnpp", "mnist_nice"),
    "model.progressive_input": ("residual", "none"),
    "model.encoder": ("small", "64", "large"),
    "model.image_net": ("ncsnpp", "small"),
    "model.energy_head": ("residual", "scalar"),
    "data.preprocess": ("minus_one_one", "logit"),
    "data.loader": ("auto", "pil", "dali"),
    "data.on_error": ("raise", "skip"),
    "dist.device": ("auto", "cpu", "cuda"),
    "model.gen_norm": ("batch", "none"),
    "model.sample_bn_mode": ("eval", "train"),
    "loss.ablation": ("full", "no_latent", "kl_only", "kl_no_entropy"),
    "loss.recon_mode": ("elbo_encoder", "mse_prior_z"),
    "loss.r1_target": ("full_conditional", "energy_only"),
    "loss.r1_precision": ("fp32", "network"),
    "optim.lr_schedule": ("constant", "cosine"),
    "dist.backend": ("torch", "deepspeed"),
    "dist.zero_stage": (0, 1, 2),
    "dist.precision": ("fp32", "bf16", "fp16"),
    "train.fast_path": ("auto", "generic"),
    "train.fast_products": ("auto", "onednn", "aten"),
}

# Keys that may change when a run resumes without making it a different experiment. The world size is no key
# (it comes from the launcher), so a requeue on another number of ranks resumes; the collective timeout and
# the non-finite budget are operational. Backend, ZeRO stage, precision and clipping change the run: not here.
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.snapshot_every", "train.ckpt_every",
                     "train.keep_ckpts", "train.threads", "train.eval_at_end", "train.max_nonfinite",
                     "train.fast_path", "train.fast_products",
                     "dist.timeout_s", "dist.resume_timeout_s", "dist.device", "data.root", "data.loader",
                     "data.workers", "eval", "sample")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The YAML at `path` with its `base:` chain merged underneath (plain dicts, later wins)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config base cycle through {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read ({err})") from None
    if data is None:  # an empty file would train on the schema's defaults without a word
        raise ConfigError(f"{path} is empty: a config is a mapping of sections (see configs/)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, not a {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: base: {base!r} must name a YAML file (relative to {path.parent})")
    parent = _read_yaml(path.parent / base, seen + (path.resolve(),))
    return _deep_merge(parent, data)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _check_values(cfg: DictConfig) -> None:
    """Every value check of a merged config, in one place: the numeric ranges (ddaebm/config/ranges.py, beside
    the schema), the string choices, and the relations between fields."""
    _check_ranges(cfg)
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")
    name = cfg.name
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError(f"name={name!r}: the run's name is a folder name under runs/ (not empty, no '/')")
    _check_variances(cfg.diffusion)
    _check_per_step(cfg, "loss.r1_gamma_scale", "≥ 0 (a factor on r1_gamma per step k)")
    _check_per_step(cfg, "loss.step_probs", "≥ 0 with a positive sum (how often each step k is drawn)",
                    positive_sum=True)
    if cfg.model.energy_base_std > 0 and cfg.model.arch != "toy":
        raise ConfigError(f"model.energy_base_std must be 0 unless model.arch=toy; got "
                          f"{cfg.model.energy_base_std} with model.arch={cfg.model.arch}")
    if cfg.dist.precision == "fp16" and cfg.dist.backend != "deepspeed":
        raise ConfigError("dist.precision=fp16 needs dist.backend=deepspeed (its dynamic loss scaling); "
                          "the torch backend offers fp32 and bf16")
    for lo, hi, strict in (("model.logvar_min", "model.logvar_max", False), ("eval.range_lo", "eval.range_hi", True),
                           ("diffusion.beta_min", "diffusion.beta_max", False)):
        a, b = OmegaConf.select(cfg, lo), OmegaConf.select(cfg, hi)
        if not (a < b if strict else a <= b):
            raise ConfigError(f"{lo}={a} must be {'below' if strict else 'at most'} {hi}={b}")
    if cfg.model.arch == "ncsnpp" and len(cfg.model.ch_mult) == 0:
        raise ConfigError("model.ch_mult is empty: the U-Net needs at least one resolution")
    if cfg.model.energy_head == "scalar" and (cfg.model.arch != "ncsnpp" or cfg.model.image_net != "small"):
        raise ConfigError("model.energy_head=scalar is a head of the small image networks: it needs model.arch=ncsnpp "
                          f"and model.image_net=small (got {cfg.model.arch}, {cfg.model.image_net})")
    if cfg.model.arch == "ncsnpp" and cfg.model.image_net == "small" and len(cfg.model.ch_mult) < 2:
        raise ConfigError(f"model.image_net=small needs model.ch_mult with at least 2 levels (full resolution and "
                          f"one below), got {list(cfg.model.ch_mult)}")


def _check_ranges(cfg: DictConfig) -> None:
    """Each number (and each entry of a list of numbers) within its range in RANGES."""
    for key, allowed in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None:  # an Optional field left unset
            continue
        for v in (value if isinstance(value, (list, ListConfig)) else [value]):
            if not allowed.admits(v):
                shown = list(value) if isinstance(value, ListConfig) else value
                kind = " (a finite float32)" if isinstance(v, float) else ""
                raise ConfigError(f"{key}={shown!r}: {'each value ' if shown is not v else ''}must be "
                                  f"{allowed.describe()}{kind}")


def _check_per_step(cfg: DictConfig, key: str, meaning: str, positive_sum: bool = False) -> None:
    """A list with one value ≥ 0 per step k (null: unset)."""
    values = OmegaConf.select(cfg, key)
    steps = cfg.diffusion.num_steps
    if values is not None and (len(values) != steps or min(values) < 0 or (positive_sum and sum(values) <= 0)):
        raise ConfigError(f"{key} must list diffusion.num_steps = {steps} values {meaning}, got {list(values)}")


def _check_variances(d: DictConfig) -> None:
    if d.variance != "explicit":
        return
    v = d.variances
    if v is None or len(v) != d.num_steps + 1:
        raise ConfigError(f"diffusion.variances must list num_steps + 1 = {d.num_steps + 1} values for "
                          f"diffusion.variance=explicit, got {None if v is None else list(v)}")
    if not all(0 < a < b < 1 for a, b in zip(v[:-1], v[1:])) or not 0 < v[-1] < 1:
        raise ConfigError(f"diffusion.variances must increase strictly inside (0, 1), got {list(v)}")


def _schema_error(err: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    return ConfigError(f"{origin}: {'key ' + repr(key) + ': ' if key else ''}{msg}")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                name: str | None = None) -> Config:
    """The typed config from a YAML file (or the schema defaults) plus `key=value` overrides.

    The name defaults to the file's stem, so `configs/toy/pinwheel.yaml` runs in `runs/pinwheel`.
    """
    cfg = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        try:
            cfg = OmegaConf.merge(cfg, _read_yaml(path))
        except OmegaConfBaseException as err:
            raise _schema_error(err, str(path)) from None
        if OmegaConf.is_missing(cfg, "name"):
            cfg.name = path.stem
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _schema_error(err, f"override {item!r}") from None
        except (yaml.YAMLError, ValueError) as err:  # the value is parsed as YAML
            raise ConfigError(f"override {item!r}: cannot be read ({str(err).splitlines()[0]})") from None
    if name is not None:
        cfg.name = name
    if OmegaConf.is_missing(cfg, "name"):
        cfg.name = "default"
    return _checked(cfg, "config")


def config_from_dict(data: dict) -> Config:
    """A typed config from a plain dict (as saved in a checkpoint)."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), data)
    except OmegaConfBaseException as err:
        raise _schema_error(err, "saved config") from None
    return _checked(cfg, "saved config")


def _checked(cfg: DictConfig, origin: str) -> Config:
    """The typed config once every value passed its check; an interpolation that cannot be resolved
    (`${...}` naming a missing key) is refused here too, naming the key."""
    try:
        _check_values(cfg)
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise _schema_error(err, origin) from None


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        full = f"{prefix}{key}"
        out.update(_flatten(value, full + ".") if isinstance(value, dict) else {full: value})
    return out


def experiment_differences(saved: dict, current: Config) -> list[str]:
    """Keys whose values differ between a saved run's config and this one, ignoring RESUMABLE_CHANGES."""
    # A key the saved run did not know yet (added to the schema since) had its default value there.
    a = {**_flatten(dataclasses.asdict(Config(name=""))), **_flatten(saved)}
    b = _flatten(to_dict(current))
    keys = sorted(set(a) | set(b))
    allowed = lambda k: any(k == p or k.startswith(p + ".") for p in RESUMABLE_CHANGES)  # noqa: E731
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k) and not allowed(k)]
