"""The step runner: a numbered registry of steps, complete-or-absent outputs, skip on rerun.

A step is a module with ``run(ctx)`` (does the work, writes atomically), ``outputs(ctx)`` (the files
that must exist when it is complete) and ``inputs(ctx)`` (files whose content it depends on). After a
successful run the runner writes ``<step>.done.json`` with the config digest of the sections the
step reads, content digests of what it read and of what it wrote (``pipeline.digests``), and
versions. A rerun skips a step whose outputs exist and whose record still matches, so a change
upstream redoes exactly the steps downstream of it; ``--force`` redoes it. Each step runs under a
lock (``pipeline.locks``).

Prerequisites are declared, not coded in the steps: a step with ``needs_base`` reads the base
run's outputs of the same step, so before it runs for any other variant the runner runs (or finds
complete) that step for the base variant; the step's module may narrow this with
``needs_base(ctx) -> bool``.
A step that is not ``per_variant`` (``prepare``) belongs to the dataset, not to a variant: it
always runs with the base variant's layout. Steps themselves only read, compute and write.
"""
from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline import io
from pipeline.config import BASE_VARIANT, Config, to_toml
from pipeline.errors import UserError
from pipeline.layout import Layout
from pipeline.digests import DigestCache, record_outputs
from pipeline.locks import remove_stale_temps, step_lock
from pipeline.provenance import versions

log = logging.getLogger("recon")


#: In a step's ``sections``: the config section of the run's own dataset (``nsd`` for run.dataset = "nsd").
DATASET_SECTION = "<run.dataset's section>"


@dataclass(frozen=True)
class StepSpec:
    """One entry of the registry: a name, the module holding run/outputs/inputs, config sections."""

    name: str
    module: str
    sections: tuple[str, ...]
    help: str
    default: bool = True  # False: runs only when asked for (--only, or an experiment's methods)
    needs_base: bool = False  # a variant's run reads the base variant's outputs of this step
    per_variant: bool = True  # False: one run per subject, with the base layout (the common format)

    def load(self):
        return importlib.import_module(self.module)

    def config_digest(self, cfg: Config) -> str:
        """The digest of what this step reads of ``cfg`` (:data:`DATASET_SECTION` → the dataset's section)."""
        return cfg.digest([cfg.run.dataset if s == DATASET_SECTION else s for s in self.sections])


STEPS: tuple[StepSpec, ...] = (
    StepSpec("prepare", "prepare_data.prepare", ("run.dataset", DATASET_SECTION),
             "raw dataset → common format", per_variant=False),
    StepSpec("features", "regression.extract_features", ("models", "features", "run.tiny_models"),
             "VDVAE latents and CLIP-text/vision embeddings of train/test images", needs_base=True),
    StepSpec("ridge", "regression.ridge_step", ("ridge",), "fMRI → features ridge, predictions on the test set",
             needs_base=True),
    StepSpec("vdvae_init", "reconstruct.vdvae_init", ("models", "vdvae_init", "features.vdvae_groups", "run.tiny_models"),
             "decode predicted VDVAE latents → 64×64 init images (512 px PNG)"),
    StepSpec("versatile", "reconstruct.versatile", ("models", "versatile", "run.tiny_models"),
             "Versatile Diffusion img2img from init images and predicted CLIP embeddings"),
    StepSpec("icnn", "reconstruct.icnn", ("icnn", "run.tiny_models"),
             "iCNN baseline: VGG19 features, ridge decoding, relu7-DGN reconstruction (on request)", default=False),
    StepSpec("evaluate", "evaluation.quantitative_eval", ("evaluate", "run.tiny_models"),
             "8 metrics + decoder metrics, CSV/JSON tables and plots"),
    # the icnn step's stages (it runs them in order; each can also be asked for alone)
    StepSpec("icnn_features", "reconstruct.icnn.features",
             ("icnn.layers", "icnn.image_size", "icnn.vgg19", "run.tiny_models"),
             "iCNN stage 1: VGG19 features of the subject's images (base run, shared by variants)", default=False,
             per_variant=False),
    StepSpec("icnn_decode", "reconstruct.icnn.decode", ("icnn.layers", "icnn.alpha", "icnn.n_voxels"),
             "iCNN stage 2: fMRI → VGG19 features with the variant's training rows", default=False),
    StepSpec("icnn_recon", "reconstruct.icnn.recon",
             ("icnn.layers", "icnn.image_size", "icnn.n_iter", "icnn.lr_start", "icnn.lr_end", "icnn.momentum_start",
              "icnn.momentum_end", "icnn.decay_start", "icnn.decay_end", "icnn.seed", "icnn.vgg19", "icnn.generator",
              "icnn.generator_bound", "run.tiny_models"),
             "iCNN stage 3: relu7-generator reconstruction of each test image", default=False),
)
STEP_NAMES = tuple(s.name for s in STEPS)


def step_spec(name: str) -> StepSpec:
    for spec in STEPS:
        if spec.name == name:
            return spec
    raise UserError(f"unknown step {name!r}; steps are: {', '.join(STEP_NAMES)}")


@dataclass
class Context:
    """What a step gets: the config, where to read/write, the device, whether to redo."""

    cfg: Config
    layout: Layout
    device: str = "cpu"
    force: bool = False
    progress: bool = True
    resume: bool = False  # set by the runner: outputs already on disk were made by this config and inputs

    @property
    def subject(self) -> str:
        return self.layout.subject

    @property
    def variant(self) -> str:
        return self.layout.variant

    def for_base(self, force: bool | None = None) -> "Context":
        """The same run for the base variant (``force`` kept unless given)."""
        return Context(cfg=self.cfg, layout=self.layout.base, device=self.device,
                       force=self.force if force is None else force, progress=self.progress)


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when available else 'cpu'; an unavailable GPU is a clear error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but PyTorch sees no CUDA GPU (use --device cpu)")
    return device


def _input_key(ctx: "Context", path: Path) -> str:
    """An input's name in a record: relative to the data/results roots, so a results folder copied
    to another machine or path stays complete."""
    roots = [Path(ctx.cfg.paths.results_dir).expanduser().resolve(), Path(ctx.cfg.paths.data_dir).expanduser().resolve()]
    for tag, root in zip(("results", "data"), roots):
        try:
            return f"<{tag}>/{Path(path).resolve().relative_to(root).as_posix()}"
        except ValueError:
            continue
    return str(path)


def _input_digests(ctx: "Context", paths: list[Path], cache: DigestCache) -> dict[str, str]:
    """{input: content digest}; folders by the digests of their members (see pipeline.digests)."""
    return {_input_key(ctx, Path(p)): cache.digest(p) for p in paths}


def _load_record(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        record = io.load_json(path)
    except UserError:
        return None
    return record if isinstance(record, dict) else None


def _cache_for(*records: dict | None) -> DigestCache:
    """A digest cache primed with the input files these records saw (unchanged ones are not re-hashed)."""
    hints: dict[str, list] = {}
    for record in records:
        if record:
            hints.update(record.get("input_files") or {})
    return DigestCache(hints)


def is_complete(spec: StepSpec, ctx: Context, cache: DigestCache | None = None) -> tuple[bool, str]:
    """(complete?, reason) — outputs all present and the record matches config and input contents.

    ``cache``: share one across the checks of a run, so a changed input is hashed once.
    """
    if not spec.per_variant and ctx.variant != BASE_VARIANT:
        ctx = ctx.for_base()
    mod = spec.load()
    record_path = ctx.layout.record(spec.name)
    if not record_path.is_file():
        return False, "not run yet"
    missing = [p for p in mod.outputs(ctx) if not Path(p).exists()]
    if missing:
        return False, f"missing output {missing[0]}"
    record = _load_record(record_path)
    if record is None:
        return False, "unreadable completion record"
    if record.get("config_digest") != spec.config_digest(ctx.cfg):
        return False, "configuration changed"
    current = _input_digests(ctx, list(mod.inputs(ctx)), cache or _cache_for(record))
    recorded = record.get("inputs") or {}
    if recorded != current:
        changed = sorted(k for k in set(current) | set(recorded) if current.get(k) != recorded.get(k))
        return False, f"input changed: {changed[0]}"
    return True, "complete"


def _started_path(record_path: Path) -> Path:
    return record_path.with_name(record_path.name.replace(".done.json", ".started.json"))


def _lock_path(record_path: Path) -> Path:
    return record_path.with_name(record_path.name.replace(".done.json", ".lock"))


def _matches(record: dict | None, digest: str, inputs: dict) -> bool:
    """Does ``record`` describe a run with this config digest and these inputs?"""
    return bool(record) and record.get("config_digest") == digest and record.get("inputs") == inputs


def needs_base(spec: StepSpec, ctx: Context) -> bool:
    """Must the base variant's run of ``spec`` be complete before ``ctx``'s variant runs it?"""
    if not spec.needs_base or ctx.variant == BASE_VARIANT:
        return False
    narrow = getattr(spec.load(), "needs_base", None)
    return narrow is None or bool(narrow(ctx))


def run_step(spec: StepSpec, ctx: Context) -> bool:
    """Run one step unless complete; returns True when it ran.

    A step that is not ``per_variant`` runs with the base layout whatever ``ctx``'s variant. When
    a variant's step that ``needs_base`` is to run, the base run of the step is brought up to date
    first (never forced, so ``--force`` on a variant redoes only the variant). The step runs under its
    lock (a second run on the same output folder stops with one line). Outputs already on disk are
    kept (``ctx.resume``) only when a completion or start record shows they were made with the same
    config and inputs; otherwise the step starts afresh.
    """
    if not spec.per_variant and ctx.variant != BASE_VARIANT:
        return run_step(spec, ctx.for_base())
    record_path = ctx.layout.record(spec.name)
    where = f"sub{ctx.subject}/{ctx.variant}"
    cache = _cache_for(_load_record(record_path), _load_record(_started_path(record_path)))
    if not ctx.force and is_complete(spec, ctx, cache)[0]:  # read-only: tasks sharing a step need no lock
        log.info("[%s] %s: complete, skipping (--force to redo)", spec.name, where)
        return False
    if needs_base(spec, ctx):  # before this variant's lock: the base has its own
        run_step(spec, ctx.for_base(force=False))
    with step_lock(_lock_path(record_path), f"step {spec.name} for {where}"):
        return _run_locked(spec, ctx, record_path, where, cache)


def _run_locked(spec: StepSpec, ctx: Context, record_path: Path, where: str, cache: DigestCache) -> bool:
    mod = spec.load()
    if not ctx.force:  # checked again under the lock: a run that held it may just have finished
        done, reason = is_complete(spec, ctx, cache)
        if done:
            log.info("[%s] %s: complete, skipping (--force to redo)", spec.name, where)
            return False
    else:
        reason = "--force"
    started_path = _started_path(record_path)
    digest = spec.config_digest(ctx.cfg)
    done_record, started_record = _load_record(record_path), _load_record(started_path)
    inputs = _input_digests(ctx, list(mod.inputs(ctx)), cache)
    ctx.resume = not ctx.force and (_matches(done_record, digest, inputs) or _matches(started_record, digest, inputs))
    if record_path.exists():
        record_path.unlink()  # a half-redone step must not look complete
    removed = remove_stale_temps([*_safe_outputs(mod, ctx), record_path, started_path])
    if removed:
        log.info("[%s] %s: removed %d temp file(s) left by an interrupted run", spec.name, where, len(removed))
    io.save_json(started_path, {"step": spec.name, "config_digest": digest, "inputs": inputs,
                                "input_files": cache.seen})
    log.info("[%s] %s: start (%s%s)", spec.name, where, reason, ", resuming" if ctx.resume else "")
    t0 = time.perf_counter()
    mod.run(ctx)
    elapsed = time.perf_counter() - t0
    outputs = [Path(p) for p in mod.outputs(ctx)]
    missing = [p for p in outputs if not p.exists()]
    if missing:
        raise RuntimeError(f"step {spec.name} finished without writing {missing[0]}")
    record = {
        "step": spec.name,
        "subject": ctx.subject,
        "variant": ctx.variant,
        "config_digest": digest,
        "inputs": _input_digests(ctx, list(mod.inputs(ctx)), cache),
        "input_files": cache.seen,
        "outputs": [str(p) for p in outputs],
        "output_digests": record_outputs(record_path.parent, outputs),
        "seconds": round(elapsed, 3),
        "device": ctx.device,
        "versions": versions(),
        "config": ctx.cfg.to_dict(),
    }
    out_dir = record_path.parent
    io.save_text(out_dir / "config.toml", to_toml(ctx.cfg))
    io.save_json(record_path, record)
    started_path.unlink(missing_ok=True)
    log.info("[%s] %s: done in %.1f s", spec.name, where, elapsed)
    return True


def _safe_outputs(mod, ctx: Context) -> list[Path]:
    """The step's outputs, or none when they cannot be listed yet (their inputs are missing)."""
    try:
        return [Path(p) for p in mod.outputs(ctx)]
    except UserError:
        return []


def select_steps(only: list[str] | None = None, start: str | None = None) -> list[StepSpec]:
    if only:
        return [step_spec(n) for n in only]
    if start:
        idx = STEP_NAMES.index(step_spec(start).name)
        return [s for s in STEPS[idx:] if s.default or s.name == start]
    return [s for s in STEPS if s.default]


def list_steps() -> str:
    width = max(len(s.name) for s in STEPS)
    return "\n".join(f"{i + 1:>2}. {s.name:<{width}}  {s.help}" for i, s in enumerate(STEPS))


def run_pipeline(cfg: Config, steps: list[StepSpec], subjects: list[str], device: str, force: bool = False,
                 progress: bool = True, on_step: Callable[[StepSpec, Context], None] | None = None) -> None:
    """Run the selected steps for every subject, in order, for the variant ``run.variant``."""
    device = resolve_device(device)
    for subject in subjects:
        for spec in steps:
            ctx = Context(cfg=cfg, layout=Layout(cfg, str(subject), cfg.run.variant), device=device, force=force,
                          progress=progress)
            if not spec.per_variant:
                ctx = ctx.for_base()
            run_step(spec, ctx)
            if on_step:
                on_step(spec, ctx)
