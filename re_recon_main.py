#!/usr/bin/env python
"""Run a named experiment grid (configs/experiments/<name>.toml) locally or on SLURM.

    python re_recon_main.py dropout_demo --dry-run        # what is complete, what would run
    python re_recon_main.py dropout_demo                  # run what is missing, here
    python re_recon_main.py dropout_demo --executor inline  # ... in this process, networks loaded once
    python re_recon_main.py dropout_deeprecon --executor slurm --partition gpu --gpus 1
    python re_recon_main.py dropout_deeprecon --status    # done / running / failed, with logs
    python re_recon_main.py dropout_deeprecon --report    # tables and plots only

Tasks are (subject × variant); each is idempotent, so resubmitting runs only what is missing.
Tasks of the unchanged training set ('base') run first: every other variant reuses its features.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import time
from pathlib import Path

from experiments import grid, tasks as ex
from pipeline import io
from pipeline.config import BASE_VARIANT
from pipeline.cli import guarded, setup_logging
from pipeline.errors import UserError
from pipeline.layout import experiment_dir


EXECUTORS = ("inline", "local", "slurm", "debug")


def build_parser() -> argparse.ArgumentParser:
    from pipeline.cli import OneLineParser

    p = OneLineParser(prog="re_recon_main.py", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="name in configs/experiments/ (or a path to a .toml file)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="list tasks and whether they would run")
    mode.add_argument("--status", action="store_true", help="table of tasks: done / running / failed / pending")
    mode.add_argument("--report", action="store_true", help="only (re)build the experiment's tables and plots")
    p.add_argument("--config", "-c", action="append", default=[], help="extra config file(s) for every task")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--subject", "-s", action="append", default=None, help="restrict to these subjects")
    p.add_argument("--variant", action="append", default=None, metavar="GLOB", help="restrict to matching variants")
    p.add_argument("--device", default=None)
    p.add_argument("--executor", choices=EXECUTORS, default=None,
                   help="inline: one task after another in this process, networks loaded once; local: a "
                        "subprocess per task here; slurm: submit with submitit; debug: submitit in this process")
    p.add_argument("--max-parallel", type=int, default=None, help="local executor: tasks at a time (default 1)")
    p.add_argument("--partition", default=None)
    p.add_argument("--gpus", type=int, default=None)
    p.add_argument("--cpus", type=int, default=None)
    p.add_argument("--time", type=int, default=None, help="SLURM time limit in minutes")
    p.add_argument("--mem", type=int, default=None, help="SLURM memory in GB")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="tracebacks for user errors")
    return p


def select_tasks(exp, args) -> list:
    tasks = ex.all_tasks(exp, args.config, args.overrides)
    if args.subject:
        tasks = [t for t in tasks if t.subject in args.subject]
    if args.variant:
        tasks = [t for t in tasks if any(fnmatch.fnmatch(t.variant.name, g) for g in args.variant)]
    if not tasks:
        raise UserError(f"experiment {exp.name}: no task matches the selection")
    return tasks


def executor_settings(exp, args) -> dict:
    e = dict(exp.executor)
    pick = lambda flag, key, default: flag if flag is not None else e.get(key, default)  # noqa: E731
    if args.executor is None and e.get("name", "local") not in EXECUTORS:
        raise UserError(f"{exp.path}: [executor] name = {e['name']!r}; expected one of {', '.join(EXECUTORS)}")
    return {
        "name": pick(args.executor, "name", "local"),
        "max_parallel": pick(args.max_parallel, "max_parallel", 1),
        "partition": pick(args.partition, "slurm_partition", ""),
        "gpus": pick(args.gpus, "slurm_gpus", 1),
        "cpus": pick(args.cpus, "slurm_cpus", 8),
        "time": pick(args.time, "slurm_time_min", 240),
        "mem": pick(args.mem, "slurm_mem_gb", 64),
    }


def slurm_parameters(settings: dict) -> dict:
    """submitit AutoExecutor parameters for the SLURM resources in ``settings``."""
    params = dict(timeout_min=int(settings["time"]), gpus_per_node=int(settings["gpus"]),
                  cpus_per_task=int(settings["cpus"]), mem_gb=int(settings["mem"]), name="recon-diffuser")
    if settings["partition"]:
        params["slurm_partition"] = settings["partition"]
    return params


def make_executor(settings: dict, log_dir: Path, cluster: str | None = None):
    """The submitit executor for ``settings['name']``; ``cluster`` overrides the SLURM back end
    (``'debug'`` runs the same AutoExecutor in-process, for tests)."""
    import submitit

    name = settings["name"]
    if name == "debug":
        return submitit.DebugExecutor(folder=log_dir)
    if name == "local":
        executor = submitit.LocalExecutor(folder=log_dir)
        executor.update_parameters(timeout_min=int(settings["time"]))
        return executor
    executor = submitit.AutoExecutor(folder=log_dir, cluster=cluster or "slurm")
    executor.update_parameters(**slurm_parameters(settings))
    return executor


def print_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def run(args) -> None:
    exp = grid.load_experiment(args.experiment)
    tasks = select_tasks(exp, args)
    cfg = exp.config(args.overrides, args.config)
    root = experiment_dir(cfg, exp.name)
    if args.status:
        rows = []
        for t in tasks:
            st = ex.task_state(exp, t, args.config, args.overrides)
            rows.append((t.name, st.get("state", "?"), st.get("log", "") or "-", st.get("error", "")[:60]))
        print_table(rows, ("task", "state", "log", "error"))
        return
    if args.report:
        from experiments.report import write_report

        print(f"report: {write_report(exp, tasks, args.config, args.overrides)}")
        return
    todo = [t for t in tasks if not ex.task_complete(exp, t, args.config, args.overrides)]
    print(f"experiment {exp.name}: {len(tasks)} tasks, {len(tasks) - len(todo)} complete, {len(todo)} to run")
    if args.dry_run:
        print_table([(t.name, "complete" if t not in todo else "will run") for t in tasks], ("task", "status"))
        return
    if todo and not submit_all(exp, todo, executor_settings(exp, args), root / "logs", args):
        return
    from experiments.report import write_report

    print(f"report: {write_report(exp, tasks, args.config, args.overrides)}")


def _submit(executor, exp, task, log_dir: Path, args):
    cfg = ex.task_config(exp, task, args.config, args.overrides)
    io.save_json(ex.status_path(cfg, task), {"task": task.name, "state": "submitted"})  # no stale outcome
    job = executor.submit(ex.run_task, str(exp.path), task.name, args.device, tuple(args.config),
                          tuple(args.overrides), not args.no_progress)
    log = str(job.paths.stderr)
    io.save_json(ex.job_path(cfg, task), {"job_id": str(job.job_id), "log": log})
    print(f"submitted {task.name} (job {job.job_id}, log {log})")
    return job


def _job_finished(job) -> bool:
    """Whether submitit's job has ended (process state or scheduler state; its result pickle is
    never read: outcomes come from the project's own task record)."""
    try:
        return job.done()
    except Exception:  # noqa: BLE001 - the debug executor runs the task inside done() and re-raises
        return True


def task_outcome(exp, task, args, log: str) -> tuple[str, str]:
    """('done', '') or ('failed', one line) from the task's JSON record written by ``run_task``."""
    path = ex.status_path(ex.task_config(exp, task, args.config, args.overrides), task)
    record = io.load_json(path) if path.is_file() else {}
    state = record.get("state")
    if state == "done":
        return "done", ""
    if state == "failed":
        return "failed", " ".join(str(record.get("error", "")).split()) or "failed"
    return "failed", f"the task ended without recording an outcome (state {state or 'none'}; see {log})"


def submit_all(exp, todo, settings, log_dir: Path, args) -> bool:
    """Base tasks first (their features are reused by every other variant), then the rest.

    SLURM: the second wave waits for the first through a job dependency and this command returns
    at once (follow with --status). Local/debug: at most ``max_parallel`` tasks at a time, here.
    Inline: one after another in this process (``run_inline``).
    """
    waves = [[t for t in todo if t.variant.name == BASE_VARIANT], [t for t in todo if t.variant.name != BASE_VARIANT]]
    if settings["name"] == "inline":
        return run_inline(exp, [t for wave in waves for t in wave], args)
    executor = make_executor(settings, log_dir)
    if settings["name"] == "slurm":
        first = [_submit(executor, exp, t, log_dir, args) for t in waves[0]]
        if first:
            executor.update_parameters(
                slurm_additional_parameters={"dependency": "afterany:" + ":".join(j.job_id for j in first)})
        for t in waves[1]:
            _submit(executor, exp, t, log_dir, args)
        print("submitted to SLURM; follow with --status, then --report when done")
        return False
    limit = max(1, int(settings["max_parallel"]))
    failures = []
    for wave in waves:
        pending, running = list(wave), []
        while pending or running:
            while pending and len(running) < limit:
                task = pending.pop(0)
                running.append((task, _submit(executor, exp, task, log_dir, args)))
            still = []
            for task, job in running:
                if not _job_finished(job):
                    still.append((task, job))
                    continue
                _report_outcome(exp, task, args, str(job.paths.stderr), failures)
            running = still
            if running:
                time.sleep(1.0)
    _raise_if_failed(failures)
    return True


def _report_outcome(exp, task, args, log: str, failures: list) -> None:
    """Print the task's outcome from its record; a failure is collected, not raised: one failed
    task must not stop the grid."""
    outcome, error = task_outcome(exp, task, args, log)
    if outcome == "done":
        print(f"done      {task.name}")
    else:
        failures.append((task.name, error))
        print(f"FAILED    {task.name}: {error}", file=sys.stderr)


def _raise_if_failed(failures: list) -> None:
    if failures:
        raise UserError(f"{len(failures)} task(s) failed, e.g. {failures[0][0]}: {failures[0][1]} "
                        f"(see --status; rerun to retry only those)")


def run_inline(exp, todo, args) -> bool:
    """Run the tasks one after another in this process: no process start-up and no reloading of the
    networks per task (half of the demo grid's time on a CPU). Their log is this terminal's."""
    failures = []
    for task in todo:
        cfg = ex.task_config(exp, task, args.config, args.overrides)
        io.save_json(ex.status_path(cfg, task), {"task": task.name, "state": "submitted"})  # no stale outcome
        io.save_json(ex.job_path(cfg, task), {"job_id": f"inline-{os.getpid()}", "log": ""})
        print(f"running   {task.name}", flush=True)
        try:
            ex.run_task(str(exp.path), task.name, args.device, tuple(args.config), tuple(args.overrides),
                        not args.no_progress)
        except Exception:  # noqa: BLE001 - run_task has recorded it; _report_outcome reads the record
            pass
        _report_outcome(exp, task, args, "this terminal", failures)
    _raise_if_failed(failures)
    return True


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)
    return guarded(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
