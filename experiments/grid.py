"""Experiment grids as plain data: a TOML file names a dataset, subjects and variant grids.

``configs/experiments/<name>.toml``::

    [experiment]
    dataset = "deeprecon"
    subjects = ["TH", "AM"]
    configs = ["configs/deeprecon.toml"]   # applied first (relative to the repository root)
    baseline = true                        # also run the unchanged training set ('base')
    methods = ["braindiffuser", "icnn"]    # optional: the iCNN baseline on every variant too

    [set]                                  # config overrides for every task
    "versatile.batch_size" = 8

    [[variants]]                           # lists expand as a grid (product)
    method = "random"
    fraction = [0.75, 0.5, 0.25, 0.1]
    draw = [0, 1]

    [executor]                             # defaults for re_recon_main.py flags
    name = "slurm"
    slurm_partition = "gpu"

A variant parameter whose name contains a dot (``"versatile.mix_text"``) is a config override of
that task; every other parameter goes to the variant's builder (:data:`experiments.builders.BUILDERS`).
The tasks of a grid (one per subject × variant) are in :mod:`experiments.tasks`.
"""
from __future__ import annotations

import inspect
import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.builders import BUILDERS
from pipeline.config import BASE_VARIANT, Config, check_name, load_config
from pipeline.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT_DIR = REPO_ROOT / "configs" / "experiments"
RUN_STEPS = ("features", "ridge", "vdvae_init", "versatile", "evaluate")
METHODS = {"braindiffuser": (), "icnn": ("icnn",)}  # extra steps each reconstruction method needs



@dataclass(frozen=True)
class VariantSpec:
    name: str
    method: str
    params: tuple[tuple[str, Any], ...] = ()  # builder parameters
    overrides: tuple[str, ...] = ()  # "section.key=value" config overrides


@dataclass
class Experiment:
    name: str
    path: Path
    dataset: str
    subjects: list[str] | None  # None: the subjects of the resolved config
    configs: list[Path]
    overrides: list[str]
    variants: list[VariantSpec]
    executor: dict[str, Any] = field(default_factory=dict)
    methods: list[str] = field(default_factory=lambda: ["braindiffuser"])

    @property
    def steps(self) -> tuple[str, ...]:
        """The steps of every task: Brain-Diffuser's, plus each extra method's, evaluation last."""
        extra = tuple(s for m in self.methods for s in METHODS[m])
        return RUN_STEPS[:-1] + extra + RUN_STEPS[-1:]

    def config(self, extra_overrides: list[str] = (), extra_configs: list[str] = ()) -> Config:
        return load_config([*self.configs, *extra_configs],
                           [f"run.dataset={self.dataset}", *self.overrides, *extra_overrides])


@dataclass(frozen=True)
class Task:
    experiment: str
    subject: str
    variant: VariantSpec

    @property
    def name(self) -> str:
        return f"sub{self.subject}__{self.variant.name}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and ("/" in value or value.endswith(".npy")):
        return Path(value).stem  # a variant file: its name, not its folder
    return str(value)


def variant_name(method: str, params: dict[str, Any]) -> str:
    parts = [method] + [f"{k.split('.')[-1]}-{_fmt(v)}" for k, v in params.items()]
    return "_".join(parts).replace("/", "-")


def expand(entry: dict[str, Any], source: str) -> list[VariantSpec]:
    entry = dict(entry)
    method = entry.pop("method", None)
    if method not in BUILDERS:
        raise UserError(f"{source}: variant method {method!r} unknown; known: {', '.join(BUILDERS)}")
    name_prefix = entry.pop("name", None)
    keys = list(entry)
    params_ok = [n for n in inspect.signature(BUILDERS[method]).parameters if n not in ("layout", "cfg")]
    unknown = [k for k in keys if "." not in k and k not in params_ok]
    if unknown:
        raise UserError(f"{source}: unknown key(s) {unknown} for method {method!r}; known: "
                        f"{', '.join(params_ok) or '(none)'} or section.key config overrides")
    grids = [v if isinstance(v, list) else [v] for v in entry.values()]
    out = []
    for combo in itertools.product(*grids):
        params = dict(zip(keys, combo))
        builder = tuple((k, v) for k, v in params.items() if "." not in k)
        overrides = tuple(f"{k}={_toml_scalar(v)}" for k, v in params.items() if "." in k)  # exact values
        name = check_name(variant_name(name_prefix or method, params), f"{source}: variant name")
        try:  # an unknown key or a bad value fails here, not in the task
            load_config([], overrides)
        except UserError as exc:
            raise UserError(f"{source}: {exc}") from None
        out.append(VariantSpec(name, method, builder, overrides))
    return out


def find_experiment(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.is_file():
        return p
    candidate = EXPERIMENT_DIR / f"{name_or_path}.toml"
    if candidate.is_file():
        return candidate
    known = sorted(f.stem for f in EXPERIMENT_DIR.glob("*.toml"))
    raise UserError(f"experiment {name_or_path!r} not found in {EXPERIMENT_DIR}; known: {', '.join(known)}")


def load_experiment(name_or_path: str) -> Experiment:
    path = find_experiment(name_or_path)
    with open(path, "rb") as fh:
        try:
            data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{path}: invalid TOML ({exc})") from None
    unknown = set(data) - {"experiment", "set", "variants", "executor"}
    if unknown:
        raise UserError(f"{path}: unknown section(s) {sorted(unknown)}; expected experiment, set, variants, executor")
    check_name(path.stem, "experiment name")
    head = data.get("experiment", {})
    if "dataset" not in head:
        raise UserError(f"{path}: [experiment] needs a dataset")
    variants = [VariantSpec(BASE_VARIANT, "settings")] if head.get("baseline", True) else []
    for i, entry in enumerate(data.get("variants", [])):
        variants.extend(expand(entry, f"{path} [[variants]] #{i + 1}"))
    names = [v.name for v in variants]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise UserError(f"{path}: duplicate variant names {sorted(dupes)}")
    overrides = [f"{k}={_toml_scalar(v)}" for k, v in data.get("set", {}).items()]
    for s in head.get("subjects", []):
        check_name(s, f"{path}: subject")
    methods = head.get("methods", ["braindiffuser"])
    unknown_methods = [m for m in methods if m not in METHODS]
    if unknown_methods or "braindiffuser" not in methods:
        raise UserError(f"{path}: methods must include 'braindiffuser' and may add {sorted(set(METHODS) - {'braindiffuser'})}"
                        f"; got {methods}")
    return Experiment(
        name=path.stem, path=path, dataset=head["dataset"],
        subjects=[str(s) for s in head.get("subjects", [])] or None,
        configs=[REPO_ROOT / c if not Path(c).is_absolute() else Path(c) for c in head.get("configs", [])],
        overrides=overrides, variants=variants, executor=data.get("executor", {}), methods=list(methods))


def _toml_scalar(v: Any) -> str:
    """A TOML value as the exact ``--set`` text (floats keep every digit; 0.0 reads as 0)."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, list):
        return ",".join(_toml_scalar(x) for x in v)
    if isinstance(v, float):
        text = repr(v)
        return text[:-2] if text.endswith(".0") else text
    return str(v)
