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
that task; every other parameter goes to the variant's builder (:data:`BUILDERS`). A task is one
(subject, variant); it is idempotent because every step is complete-or-absent.
"""
from __future__ import annotations

import inspect
import itertools
import logging
import os
import shutil
import socket
import subprocess
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline import io
from pipeline.config import Config, check_name, load_config
from pipeline.errors import UserError
from pipeline.layout import Layout

log = logging.getLogger("recon")
REPO_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT_DIR = REPO_ROOT / "configs" / "experiments"
RUN_STEPS = ("features", "ridge", "vdvae_init", "versatile", "evaluate")
METHODS = {"braindiffuser": (), "icnn": ("icnn",)}  # extra steps each reconstruction method needs


# ---------------------------------------------------------------------------------------------
# variant builders: method name → function(layout, cfg, **params) → dict of variant arrays


def _train(layout: Layout, parts=("stim",)):
    from pipeline.common_format import read_split

    return read_split(layout.base.data_dir, "train", layout.subject, parts=parts)


def _build_random(layout, cfg, fraction: float, draw: int = 0, seed: int = 0):
    from dropout.random import select_random

    n = len(_train(layout, ("nrep",)))
    return {"indices": select_random(n, float(fraction), int(draw), int(seed))}


def _build_diversity(layout, cfg, space: str, fraction: float, draw: int = 0, seed: int = 0,
                     n_neighbors: int = 15, min_dist: float = 0.1):
    from dropout import diversity

    if space == "pixels":
        emb = diversity.embed_pixels(_train(layout).stim)
    elif space == "clipvision":
        emb = diversity.embed_clipvision(io.load_npy(layout.base.features("clipvision", "train"), mmap_mode="r"))
    elif space == "dreamsim":
        emb = diversity.embed_dreamsim(_train(layout).stim, cfg.paths.weights_dir, "cpu")
    else:
        raise UserError(f"diversity space {space!r}: expected pixels, clipvision or dreamsim")
    indices, diagnostics = diversity.select_diverse(emb, float(fraction), int(draw), int(seed),
                                                    n_neighbors=int(n_neighbors), min_dist=float(min_dist))
    return {"indices": indices, "diagnostics": diagnostics}


def _build_plain(layout, cfg, subset: str, fraction: float = 0.25):
    from dropout.plain_background import select_plain

    return {"indices": select_plain(_train(layout).stim, subset, float(fraction))}


def _build_captions(layout, cfg, file: str):
    """Training captions from a caption-variant file (ai_captions/generate.py), relative to data_dir."""
    from ai_captions.variants import load_caption_variant

    ids = _train(layout, ("ids",)).ids
    return {"captions": load_caption_variant(cfg.resolve_path(file, "data_dir"), ids)}


def _build_shuffled_captions(layout, cfg, seed: int = 0):
    from ai_captions.shuffle import shuffle_captions

    return {"captions": shuffle_captions(_train(layout, ("cap",)).cap, int(seed))}


def _build_ai_captions(layout, cfg, prompt: str, captioner: str = "template", model: str = "gpt-4o-mini",
                       base_url: str = "", api_key_env: str = "OPENAI_API_KEY", workers: int = 5):
    """Captions from a vision-language model, generated on first use into
    ``<data_dir>/<dataset>/ai_captions/<captioner>/`` (resumable log shared by every subject, so no
    paid request is repeated); ``captioner = "template"`` is the offline stand-in of the demo."""
    from ai_captions import generate
    from ai_captions.variants import load_caption_variant

    out_dir = Path(cfg.paths.data_dir).expanduser() / cfg.run.dataset / "ai_captions" / captioner
    path, ids_path = generate.output_paths(out_dir, prompt)
    train = _train(layout, ("stim", "ids"))
    if not ids_path.is_file() or not set(map(str, train.ids)) <= set(map(str, io.load_npy(ids_path))):
        if captioner == "template":
            from ai_captions.template import TemplateClient

            client = TemplateClient()
        else:
            client = generate.make_client(base_url or None, api_key_env)
        gen = generate.Generator(client, model=model)
        generate.generate_captions(gen, np.asarray(train.stim), train.ids, generate.select_prompts([prompt]), out_dir,
                                   workers=int(workers), progress=False)
    return {"captions": load_caption_variant(path, train.ids)}


def _build_perturbed(layout, cfg, file: str = "", copy: int = 0, mode: str = "friendly", attack: str = "fgsm",
                     eps: float = 0.03, criterion: str = "80-20", copies: int = 1, max_steps: int = 500,
                     seed: int = 0):
    """Training images for CLIP-vision from a perturbation set (adv_pert/perturb.py): ``file``
    relative to data_dir, or generated on first use from the parameters with the pipeline's CLIP."""
    from adv_pert.perturb import CLIPObjective, load_perturbed, perturb_dataset

    train = _train(layout, ("stim", "ids", "cap"))
    if not file:
        tag = f"eps{eps:g}" if attack == "fgsm" else f"{criterion}_steps{max_steps}"
        out = (Path(cfg.paths.data_dir).expanduser() / cfg.run.dataset / "adv_pert"
               / f"{mode}_{attack}_{tag}_copies{copies}_seed{seed}")
        from models import load as load_models
        from pipeline.runner import resolve_device

        objective = CLIPObjective(load_models.clip(cfg, resolve_device(cfg.run.device)))
        path = perturb_dataset(objective, np.asarray(train.stim), train.ids, train.cap, out, mode=mode,
                               method=attack, eps=float(eps), criterion=criterion, copies=int(copies),
                               seed=int(seed), max_steps=int(max_steps), progress=False)
    else:
        path = cfg.resolve_path(file, "data_dir")
    return {"stim_clipvision": load_perturbed(path, train.ids, int(copy))}


def _build_settings(layout, cfg):
    return {}


BUILDERS: dict[str, Callable[..., dict]] = {
    "random": _build_random,
    "diversity": _build_diversity,
    "plain": _build_plain,
    "captions": _build_captions,
    "ai_captions": _build_ai_captions,
    "shuffled_captions": _build_shuffled_captions,
    "perturbed": _build_perturbed,
    "settings": _build_settings,
}


# ---------------------------------------------------------------------------------------------
# grid expansion


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
    variants = [VariantSpec("base", "settings")] if head.get("baseline", True) else []
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


# ---------------------------------------------------------------------------------------------
# running one task


def task_config(exp: Experiment, task: Task, extra_configs=(), extra_overrides=()) -> Config:
    cfg = exp.config(list(extra_overrides) + list(task.variant.overrides), list(extra_configs))
    cfg.run.variant = task.variant.name
    return cfg


def ensure_variant(cfg: Config, layout: Layout, spec: VariantSpec) -> None:
    """Write the variant's files once (deterministic, so a rerun would write the same)."""
    from pipeline.variant import variant_exists, write_variant

    if spec.name == "base" or variant_exists(layout):
        return
    built = BUILDERS[spec.method](layout, cfg, **dict(spec.params))
    diagnostics = built.pop("diagnostics", None)
    write_variant(layout, spec.method, **built, **dict(spec.params),
                  **({"diagnostics": diagnostics} if diagnostics else {}))


def status_path(cfg: Config, task: Task) -> Path:
    return Path(cfg.paths.results_dir).expanduser() / "experiments" / task.experiment / "tasks" / f"{task.name}.json"


def run_task(exp_path: str, task_name: str, device: str, extra_configs=(), extra_overrides=(),
             progress: bool = True) -> str:
    """Run every step of one task (the function submitit executes). Returns the task name."""
    from pipeline.cli import setup_logging
    from pipeline.runner import Context, resolve_device, run_step, step_spec

    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    exp = load_experiment(exp_path)
    task = next((t for t in all_tasks(exp, extra_configs, extra_overrides) if t.name == task_name), None)
    if task is None:
        raise UserError(f"task {task_name} is not part of experiment {exp.name}")
    cfg = task_config(exp, task, extra_configs, extra_overrides)
    device = resolve_device(device or cfg.run.device)
    state = status_path(cfg, task)
    record = {"task": task.name, "state": "running", "pid": os.getpid(), "host": socket.gethostname(),
              "started": time.time()}
    io.save_json(state, record)
    try:
        base = Layout(cfg, task.subject, "base")
        run_step(step_spec("prepare"), Context(cfg, base, device, progress=progress))
        layout = Layout(cfg, task.subject, task.variant.name)
        if task.variant.name != "base":
            run_step(step_spec("features"), Context(cfg, base, device, progress=progress))
            ensure_variant(cfg, layout, task.variant)
        for name in exp.steps:
            run_step(step_spec(name), Context(cfg, layout, device, progress=progress))
    except BaseException as exc:
        record.update(state="failed", error=f"{type(exc).__name__}: {exc}", finished=time.time())
        io.save_json(state, record)
        raise
    record.update(state="done", finished=time.time())
    io.save_json(state, record)
    return task.name


def all_tasks(exp: Experiment, extra_configs=(), extra_overrides=()) -> list[Task]:
    subjects = exp.subjects
    if not subjects:
        subjects = exp.config(list(extra_overrides), list(extra_configs)).run.subjects
    return [Task(exp.name, str(s), v) for s in subjects for v in exp.variants]


def task_complete(exp: Experiment, task: Task, extra_configs=(), extra_overrides=()) -> bool:
    from pipeline.runner import Context, is_complete, step_spec

    cfg = task_config(exp, task, extra_configs, extra_overrides)
    layout = Layout(cfg, task.subject, task.variant.name)
    if not Path(layout.record("evaluate")).is_file():
        return False
    for name in exp.steps:
        ctx = Context(cfg, layout, "cpu", progress=False)
        try:
            if not is_complete(step_spec(name), ctx)[0]:
                return False
        except UserError:
            return False
    return True


def job_path(cfg: Config, task: Task) -> Path:
    """Where the submitter records the task's submitit job id and log file."""
    return status_path(cfg, task).with_suffix(".job.json")


def task_state(exp: Experiment, task: Task, extra_configs=(), extra_overrides=()) -> dict:
    cfg = task_config(exp, task, extra_configs, extra_overrides)
    path = status_path(cfg, task)
    record = io.load_json(path) if path.is_file() else {"state": "pending"}
    if job_path(cfg, task).is_file():
        record.update(io.load_json(job_path(cfg, task)))
    if task_complete(exp, task, extra_configs, extra_overrides):
        record["state"] = "done"
    elif record.get("state") == "done":
        record["state"] = "incomplete"
    elif record.get("state") == "running" and _ended(record):
        # killed without a chance to say so (scancel, time limit, OOM): SIGKILL skips the handler above
        record.update(state="interrupted", error=f"process {record.get('pid')} on {record.get('host')} "
                                                 "ended before the task finished (cancelled or killed)")
    return record


_SLURM_FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED")


def _ended(record: dict) -> bool:
    """Has the process of a 'running' task record ended? Known only on its own host (pid check) or
    through SLURM (``squeue`` no longer lists its job); otherwise assume it still runs."""
    if record.get("host") == socket.gethostname() and record.get("pid"):
        try:
            os.kill(int(record["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, OverflowError, ValueError):
            return False
        try:  # a zombie (not yet reaped by its parent) has ended too
            return Path(f"/proc/{record['pid']}/stat").read_text().rsplit(") ", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            return False
    job = str(record.get("job_id", ""))
    if job.split("_")[0].isdigit() and shutil.which("squeue"):
        try:
            r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return False
        if "Invalid job id" in r.stderr:  # SLURM has forgotten the job: it ended long ago
            return True
        states = r.stdout.split()
        return r.returncode == 0 and all(st in _SLURM_FINAL for st in states)  # [] = no longer listed
    return False

