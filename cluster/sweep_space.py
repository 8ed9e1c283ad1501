"""The search space of cluster/sweep.py: the default ranges around CONFIG, --space and --param parsed into
{key: [kind, *args]}, that turned into Tune domains, and a trial's values turned into config overrides.

Kept apart from the trial and the driver because it is pure parsing: it needs neither Ray running nor a model,
and the tests exercise it on its own.
"""

from __future__ import annotations

from pathlib import Path

from ddaebm.errors import BadInput

KINDS = ("uniform", "loguniform", "choice", "grid")


VARIANCE_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # explicit variances: factors on the inner ones


def default_space(cfg) -> dict:
    """Ranges around CONFIG: w(t)'s α and β (paper LSUN (0.6, 0.2), default (1, 1)), γ within ×/÷10 of
    CONFIG's, and the β schedule in the units of CONFIG's diffusion.variance (every kind has one)."""
    gamma = cfg.loss.r1_gamma
    space = {"loss.iw_alpha": ["loguniform", 0.2, 2.0],
             "loss.iw_beta": ["loguniform", 0.1, 2.0],
             "loss.r1_gamma": ["loguniform", gamma / 10, gamma * 10] if gamma > 0 else ["loguniform", 1e-4, 0.1],
             "diffusion.grid": ["choice", "eps", "drl"]}
    return {**space, **schedule_space(cfg.diffusion)}


def schedule_space(d) -> dict:
    """The β schedule's entries for diffusion config `d`, by d.variance."""
    if d.variance == "vp":  # β(t) from beta_min to beta_max (method.md §1.3)
        return {"diffusion.beta_min": ["loguniform", 0.01, 1.0], "diffusion.beta_max": ["uniform", 5.0, 20.0]}
    if d.variance == "geometric":  # variances beta_min … beta_max, which must stay below 1
        return {"diffusion.beta_min": ["loguniform", d.beta_min / 10, min(d.beta_min * 10, 0.01)],
                "diffusion.beta_max": ["choice", 0.99, 0.999, 0.9999]}
    if d.variance == "explicit":  # the listed var(t_0) … var(t_T): its inner ones scaled, both ends kept
        return {"diffusion.variances": ["choice", *scaled_variances(list(d.variances))]}
    raise BadInput(f"the default search space has no β schedule for diffusion.variance={d.variance!r}: "
                   "name the keys to sweep with --param or --space")


def scaled_variances(variances: list[float]) -> list[list[float]]:
    """CONFIG's explicit variances with the inner ones (all but var(t_0), which sets the noise of the last step,
    and var(t_T), the prior's) multiplied by each of VARIANCE_SCALES where the list stays increasing inside (0, 1):
    the schedule moves earlier or later while both ends stay where CONFIG put them."""
    out = []
    for c in VARIANCE_SCALES:
        v = [variances[0], *(float(f"{c * x:.6g}") for x in variances[1:-1]), variances[-1]]
        if all(0 < a < b < 1 for a, b in zip(v, v[1:])) or c == 1.0:
            out.append(v)
    return out


def space_lines(space: dict) -> list[str]:
    """The space as sweep.py prints it before it starts: one line per key, `key  kind  values`."""
    width = max((len(k) for k in space), default=0)
    lines = []
    for key, spec in sorted(space.items()):
        if isinstance(spec, list) and spec and spec[0] in KINDS:
            lines.append(f"  {key:<{width}}  {spec[0]}  {', '.join(map(str, spec[1:]))}")
        else:
            lines.append(f"  {key:<{width}}  fixed  {spec}")
    return lines


def tune_domains(space: dict) -> dict:
    """{key: [kind, *args]} → Tune domains; kinds uniform, loguniform, choice, grid; a plain value is fixed."""
    from ray import tune

    kinds = {"uniform": tune.uniform, "loguniform": tune.loguniform,
             "choice": lambda *v: tune.choice(list(v)), "grid": lambda *v: tune.grid_search(list(v))}
    out = {}
    for key, spec in space.items():
        if isinstance(spec, list) and spec and spec[0] in kinds:
            out[key] = kinds[spec[0]](*spec[1:])
        elif isinstance(spec, (list, dict)):
            raise BadInput(f"--space {key}: expected [uniform|loguniform|choice|grid, ...] or a value, got {spec}")
        else:
            out[key] = spec
    return out


def read_space(text: str | None, params: list[str], cfg) -> dict:
    """--space (file or string) plus the --param entries; CONFIG's default space when neither is given. Values
    are read as config overrides are (OmegaConf's YAML: 1e-4 is a number, [20,5,1,1] a list)."""
    if text is None and not params:
        return default_space(cfg)
    space = space_of_text(text) if text is not None else {}
    for item in params:
        key, spec = param_entry(item)
        space[key] = spec
    return space


def space_of_text(text: str) -> dict:
    """--space's mapping, from a YAML/JSON file or the string itself."""
    from omegaconf import OmegaConf

    path = Path(text)
    try:
        space = OmegaConf.to_container(OmegaConf.create(path.read_text() if path.is_file() else text))
    except Exception as err:  # yaml's and OmegaConf's parse errors share no base class
        raise BadInput(f"--space: cannot read {text!r}: {' '.join(str(err).split())}") from None
    if not isinstance(space, dict):
        raise BadInput("--space must be a mapping {key: [kind, ...]} (a YAML/JSON file or string)")
    return space


def param_entry(item: str) -> tuple[str, list]:
    """(key, [kind, *values]) of one --param KEY=KIND:V1,V2,...: no spaces or quotes, so it survives the shell
    that `ray submit` passes the arguments through."""
    from omegaconf import OmegaConf

    key, _, spec = item.partition("=")
    kind, _, values = spec.partition(":")
    if not key or kind not in KINDS or not values:
        raise BadInput(f"--param {item}: expected KEY=KIND:V1,V2,... with KIND uniform, loguniform, choice or grid")
    return key, [kind, *(OmegaConf.to_container(OmegaConf.from_dotlist([f"v={v}"]))["v"]
                         for v in split_values(values, item))]


def split_values(values: str, item: str) -> list[str]:
    """V1,V2,... split at the commas outside brackets, so that a value may be a list:
    loss.r1_gamma_scale=choice:[20,5,1,1],[1,1,1,1] sweeps two lists."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(values):
        depth += (ch in "[{") - (ch in "]}")
        if depth < 0:
            break
        if ch == "," and depth == 0:
            parts.append(values[start:i])
            start = i + 1
    if depth != 0:
        raise BadInput(f"--param {item}: unbalanced brackets in {values!r}")
    parts.append(values[start:])
    if any(not part for part in parts):
        raise BadInput(f"--param {item}: an empty value in {values!r}")
    return parts


def param_overrides(params: dict) -> list[str]:
    """A trial's swept values as key=value config overrides, in a fixed order."""
    return [f"{key}={value}" for key, value in sorted(params.items())]


def example_point(space: dict) -> dict:
    """One value of every entry, to check that the keys and their types fit the config before anything runs."""
    return {key: example_value(spec) for key, spec in space.items()}


def example_value(spec):
    """A range's lower end, a choice's or grid's first value, or the fixed value itself."""
    return spec[1] if isinstance(spec, list) and len(spec) > 1 else spec
