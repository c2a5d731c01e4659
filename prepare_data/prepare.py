"""Step 1, ``prepare``: raw dataset → common format, dispatched on ``run.dataset``.

The dataset's prepare module comes from the registry (:data:`pipeline.config.DATASETS`); it reads
its own config section (``prepare_from_config``), so a new dataset does not touch this file.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline.config import dataset_spec, dataset_splits
from pipeline.errors import UserError
from pipeline.step_entry import step_main

log = logging.getLogger("recon")


def run(ctx) -> None:
    name = ctx.cfg.run.dataset
    spec = dataset_spec(name)
    module = spec.load()
    if spec.raw_dir:
        raw = ctx.cfg.resolve_path(getattr(ctx.cfg, name).raw_dir)
        if not Path(raw).is_dir():
            raise UserError(f"{raw}: raw {name} folder not found (set {name}.raw_dir or --raw-dir)")
    summary = module.prepare_from_config(ctx.cfg, ctx.layout.data_dir, ctx.subject, progress=ctx.progress)
    log.info("[prepare] sub%s: %s", ctx.subject, ", ".join(f"{k}={v}" for k, v in summary.items()
                                                             if isinstance(v, (int, str)) and k != "subject"))


def outputs(ctx) -> list[Path]:
    from pipeline.common_format import PARTS, manifest_path, part_path

    d = ctx.layout.data_dir
    return [manifest_path(d)] + [part_path(d, s, p, ctx.subject) for s in dataset_splits(ctx.cfg) for p in PARTS]


def inputs(ctx) -> list[Path]:
    return []


def main(argv=None) -> int:
    return step_main("prepare", argv)


if __name__ == "__main__":
    sys.exit(main())
