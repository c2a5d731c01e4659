"""The command line shared by the ``<dataset>_main.py`` scripts and each step's main() (via
:mod:`pipeline.step_entry`).

User mistakes end with one line on stderr and exit code 2 (the traceback only with ``--debug``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.config import DATASET_NAMES, Config, RunConfig, dataset_spec, load_config
from pipeline.errors import UserError
from pipeline.runner import STEP_NAMES, list_steps, run_pipeline, select_steps

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage block) and exit code 2, like every
    other user error."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser(dataset: str | None, prog: str | None = None, steps: bool = True) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="recon-diffuser: Brain-Diffuser pipeline"
                                + (f" for {dataset}" if dataset else ""))
    p.add_argument("--config", "-c", action="append", default=[],
                   help="TOML config file(s), applied after configs/<dataset>.toml (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field (repeatable), e.g. --set ridge.alpha_vdvae=5e4")
    p.add_argument("--subject", "-s", action="append", default=None,
                   help="subject(s) to run (repeatable; default: run.subjects of the config)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto (default: run.device)")
    p.add_argument("--data-dir", default=None, help="common-format root (paths.data_dir)")
    p.add_argument("--results-dir", default=None, help="results root (paths.results_dir)")
    p.add_argument("--weights-dir", default=None, help="model weights root (paths.weights_dir)")
    p.add_argument("--raw-dir", default=None, help="raw dataset folder (<dataset>.raw_dir)")
    p.add_argument("--variant", default=None, help="training-set variant name (default: base)")
    p.add_argument("--tiny", action="store_true", help='tiny random models (models.mode = "random-tiny") instead of real weights')
    p.add_argument("--reference-rng", action="store_true",
                   help="Versatile Diffusion noise from one sequential seed stream, as the reference script")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    if steps:
        p.add_argument("--list", action="store_true", help="print the numbered steps and exit")
        p.add_argument("--only", action="append", choices=STEP_NAMES, help="run only this step (repeatable)")
        p.add_argument("--from", dest="start", choices=STEP_NAMES, help="run from this step on")
        p.add_argument("--force", action="store_true", help="redo steps even when complete")
        p.add_argument("--list-subjects", action="store_true",
                       help="print which subjects the raw dataset folder holds and exit")
    return p


def config_from_args(args: argparse.Namespace, dataset: str | None) -> Config:
    """configs/<dataset>.toml ← --config files ← flags ← --set overrides."""
    files = []
    if dataset:
        default = CONFIG_DIR / f"{dataset}.toml"
        if default.is_file():
            files.append(default)
    files.extend(args.config)
    flags = {
        "run.dataset": dataset,
        "run.subjects": ",".join(str(s) for s in args.subject) if args.subject else None,
        "run.device": args.device,
        "paths.data_dir": args.data_dir,
        "paths.results_dir": args.results_dir,
        "paths.weights_dir": args.weights_dir,
        "run.variant": args.variant,
        "models.mode": "random-tiny" if args.tiny else None,
        "versatile.reference_rng": "true" if args.reference_rng else None,
    }
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.raw_dir:
        ds = dataset or RunConfig.dataset
        if not dataset_spec(ds).raw_dir:
            raise UserError(f"--raw-dir: dataset {ds!r} has no raw_dir")
        overrides.append(f"{ds}.raw_dir={args.raw_dir}")
    return load_config(files, overrides + list(args.overrides))


def setup_logging(debug: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("PIL", "matplotlib", "urllib3", "h5py", "numexpr", "diffusers", "transformers", "httpx", "httpx2",
                  "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def guarded(fn, debug: bool) -> int:
    """Run ``fn``; a UserError becomes one line on stderr and exit code 2."""
    try:
        fn()
    except UserError as exc:
        if debug:
            raise
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever was quoted
        return 2
    except OSError as exc:  # a folder not writable, a path that is a file, a full disk: one line
        if debug:
            raise
        print(f"error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; completed steps and images are kept, rerun to continue", file=sys.stderr)
        return 130
    return 0


def os_error_line(exc: OSError) -> str:
    """``<file>: <reason>`` for an OSError (one line, no traceback)."""
    where = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    reason = exc.strerror or str(exc) or type(exc).__name__
    text = f"{where}: {reason}" if where else reason
    return " ".join(text.split())


def check_output_dirs(cfg: Config, steps) -> None:
    """Fail in seconds, not after hours, when an output root cannot be written: the results folder
    (and the common-format folder when ``prepare`` runs) must be, or be creatable as, a writable folder."""
    roots = [("paths.results_dir", cfg.paths.results_dir)]
    if any(getattr(s, "name", s) == "prepare" for s in steps):
        roots.append(("paths.data_dir", cfg.paths.data_dir))
    import tempfile

    for key, value in roots:
        path = Path(value).expanduser()
        existing = next((p for p in [path, *path.parents] if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise UserError(f"{existing}: is a file, but {key} = {value!r} needs a folder there")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{path}: cannot create the {key} folder ({exc.strerror or exc})") from None
        try:  # permission bits say nothing for root or on a read-only mount: try it
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            raise UserError(f"{path}: folder not writable ({key}; {exc.strerror or exc})") from None


def dataset_main(dataset: str, argv: list[str] | None = None) -> int:
    """Entry point of ``<dataset>_main.py``: run every step (or a selection) for the chosen subjects."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser(dataset, prog=f"{dataset}_main.py")
    args = parser.parse_args(argv)
    if args.list:
        print(list_steps())
        return 0
    setup_logging(args.debug)

    def go():
        cfg = config_from_args(args, dataset)
        if args.list_subjects:
            print(dataset_spec(cfg.run.dataset).load().subject_table(cfg))
            return
        steps = select_steps(args.only, args.start)
        check_output_dirs(cfg, steps)
        run_pipeline(cfg, steps, cfg.run.subjects, cfg.run.device, force=args.force,
                     progress=not args.no_progress)

    return guarded(go, args.debug)


def step_main(step: str, argv: list[str] | None = None) -> int:
    """Entry point for running one step alone: ``python -m regression.ridge_step --dataset nsd``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser(None, prog=f"python -m <{step} module>", steps=False)
    parser.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    parser.add_argument("--force", action="store_true", help="redo even when complete")
    args = parser.parse_args(argv)
    setup_logging(args.debug)

    def go():
        cfg = config_from_args(args, args.dataset)
        check_output_dirs(cfg, select_steps([step]))
        run_pipeline(cfg, select_steps([step]), cfg.run.subjects, cfg.run.device, force=args.force,
                     progress=not args.no_progress)

    return guarded(go, args.debug)
