"""Step 1, ``prepare``: raw dataset → common format, dispatched on ``run.dataset``."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline.errors import UserError
from pipeline.step_entry import step_main

log = logging.getLogger("recon")


def _path_or_none(cfg, value: str, base: str | None = None) -> Path | None:
    return cfg.resolve_path(value, base) if value else None


def _options(ctx) -> tuple[callable, dict]:
    """The dataset module's prepare_subject and its keyword options from the config section."""
    cfg = ctx.cfg
    name = cfg.run.dataset
    if name == "synthetic":
        from prepare_data import synthetic

        s = cfg.synthetic
        return synthetic.prepare_subject, dict(n_train=s.n_train, n_test=s.n_test, n_voxels=s.n_voxels,
                                                image_size=s.image_size, noise=s.noise, seed=s.seed)
    if name == "nsd":
        from prepare_data import nsd

        s = cfg.nsd
        return nsd.prepare_subject, dict(raw_dir=cfg.resolve_path(s.raw_dir), n_sessions=s.n_sessions,
                                         captions=_path_or_none(cfg, s.captions), progress=ctx.progress)
    if name == "deeprecon":
        from prepare_data import deeprecon

        s = cfg.deeprecon
        return deeprecon.prepare_subject, dict(
            raw_dir=cfg.resolve_path(s.raw_dir), file_pattern=s.file_pattern,
            sessions={k: v for k, v in (("train", s.session_train), ("test", s.session_test),
                                        ("art", s.session_art)) if v},
            roi=s.roi, image_dir=_path_or_none(cfg, s.image_dir), label_key=s.label_key,
            captions=_path_or_none(cfg, s.captions), image_size=s.image_size or None, progress=ctx.progress)
    if name == "things":
        from prepare_data import things

        s = cfg.things
        opts = dict(raw_dir=cfg.resolve_path(s.raw_dir), image_dir=_path_or_none(cfg, s.image_dir),
                    captions=_path_or_none(cfg, s.captions), source=s.source, image_size=s.image_size,
                    progress=ctx.progress)
        if s.rois:
            opts["rois"] = list(s.rois)
        return things.prepare_subject, opts
    raise UserError(f"run.dataset: unknown dataset {name!r} (nsd, deeprecon, things, synthetic)")


def run(ctx) -> None:
    fn, opts = _options(ctx)
    out_dir = ctx.layout.data_dir
    if "raw_dir" in opts:
        raw = opts.pop("raw_dir")
        if not Path(raw).is_dir():
            raise UserError(f"{raw}: raw {ctx.cfg.run.dataset} folder not found (set {ctx.cfg.run.dataset}.raw_dir "
                            f"or --raw-dir)")
        summary = fn(raw, out_dir, ctx.subject, **opts)
    else:
        summary = fn(out_dir, ctx.subject, **opts)
    log.info("[prepare] sub%s: %s", ctx.subject, ", ".join(f"{k}={v}" for k, v in summary.items()
                                                             if isinstance(v, (int, str)) and k != "subject"))


def outputs(ctx) -> list[Path]:
    from pipeline.common_format import PARTS, manifest_path, part_path

    splits = ["train", "test"]
    if ctx.cfg.run.dataset == "deeprecon" and ctx.cfg.deeprecon.session_art:
        splits.append("art")
    d = ctx.layout.data_dir
    return [manifest_path(d)] + [part_path(d, s, p, ctx.subject) for s in splits for p in PARTS]


def inputs(ctx) -> list[Path]:
    return []


def subject_table(cfg) -> str:
    """Which subjects the raw dataset folder holds (``--list-subjects``)."""
    name = cfg.run.dataset
    if name == "deeprecon":
        from prepare_data import deeprecon

        s = cfg.deeprecon
        sessions = {k: v for k, v in (("train", s.session_train), ("test", s.session_test),
                                      ("art", s.session_art)) if v}
        return deeprecon.format_subject_table(
            deeprecon.list_subjects(cfg.resolve_path(s.raw_dir), s.file_pattern, sessions), sessions)
    if name == "things":
        from prepare_data import things

        return things.format_subject_table(things.list_subjects(cfg.resolve_path(cfg.things.raw_dir)))
    if name == "nsd":
        from prepare_data import nsd

        found = nsd.subjects_present(cfg.resolve_path(cfg.nsd.raw_dir))
        return "subjects with betas and an nsdgeneral ROI: " + (", ".join(map(str, found)) or "none")
    return "synthetic: any subject id (generated)"


def main(argv=None) -> int:
    return step_main("prepare", argv)


if __name__ == "__main__":
    sys.exit(main())
