"""The tasks of an experiment grid: one (subject, variant) each, run, checked and tracked.

:func:`run_task` is what an executor (local subprocess, SLURM via submitit, in-process debug) runs;
it is idempotent because every step is complete-or-absent, so resubmitting runs only what is
missing. Each task keeps a small JSON record (:func:`status_path`) that ``--status`` reads.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from experiments.builders import BASE_STEPS, BUILDERS
from experiments.grid import Experiment, Task, VariantSpec, load_experiment
from pipeline import io
from pipeline.config import BASE_VARIANT, Config
from pipeline.errors import UserError
from pipeline.layout import Layout, experiment_dir


def task_config(exp: Experiment, task: Task, extra_configs=(), extra_overrides=()) -> Config:
    cfg = exp.config(list(extra_overrides) + list(task.variant.overrides), list(extra_configs))
    cfg.run.variant = task.variant.name
    return cfg


def ensure_variant(cfg: Config, layout: Layout, spec: VariantSpec) -> None:
    """Write the variant's files once (deterministic, so a rerun would write the same)."""
    from pipeline.variant import variant_exists, write_variant

    if spec.name == BASE_VARIANT or variant_exists(layout):
        return
    built = BUILDERS[spec.method](layout, cfg, **dict(spec.params))
    diagnostics = built.pop("diagnostics", None)
    write_variant(layout, spec.method, **built, **dict(spec.params),
                  **({"diagnostics": diagnostics} if diagnostics else {}))


def status_path(cfg: Config, task: Task) -> Path:
    return experiment_dir(cfg, task.experiment) / "tasks" / f"{task.name}.json"


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
        ctx = Context(cfg, Layout(cfg, task.subject, task.variant.name), device, progress=progress)
        run_step(step_spec("prepare"), ctx)  # the runner runs prepare for the subject, whatever the variant
        if task.variant.name != BASE_VARIANT:
            for name in BASE_STEPS.get(task.variant.method, ()):  # base outputs the builder reads
                run_step(step_spec(name), ctx.for_base())
            ensure_variant(cfg, ctx.layout, task.variant)
        for name in exp.steps:  # the runner runs each step's base prerequisite first (StepSpec.needs_base)
            run_step(step_spec(name), ctx)
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
