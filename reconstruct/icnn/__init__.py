"""Step ``icnn``: the iCNN baseline (Shen, Horikawa, Majima & Kamitani 2019) on any training variant.

Three stages, each an ordinary registered step of the runner (``pipeline.runner.STEPS``) with its own
``<stage>.done.json`` record, so each is redone exactly when what it reads changes (the ``[icnn]``
fields its registry entry names, or the content of its inputs) and skipped otherwise:

1. ``icnn_features`` (:mod:`reconstruct.icnn.features`): VGG19 features of every train and test
   image, once per subject under the base run, reused by every variant.
2. ``icnn_decode`` (:mod:`reconstruct.icnn.decode`): fMRI → features with the variant's training rows.
3. ``icnn_recon`` (:mod:`reconstruct.icnn.recon`): each test image from the decoded features by
   optimising the input of the relu7 deep generator; per-image resume (``pipeline.resume``).

``icnn`` itself (``--only icnn``, ``python -m reconstruct.icnn``, an experiment's ``methods``) runs
the three in order through the runner; ``--force`` redoes them (the shared features only for the
base run). The weights are checked before the first long stage.
"""
from __future__ import annotations

from pathlib import Path

from models.icnn import check_weight_files
from pipeline.config import BASE_VARIANT
from pipeline.common_format import part_path
from pipeline.variant import variant_files
from reconstruct.icnn import decode, features, recon
from reconstruct.icnn.common import KIND, check_settings

STAGES = (features.STEP, decode.STEP, recon.STEP)


def run(ctx) -> None:
    from pipeline.runner import Context, run_step, step_spec

    check_settings(ctx.cfg)
    check_weight_files(ctx.cfg)  # missing weights fail before any long work
    for name in STAGES:
        spec = step_spec(name)  # icnn_features is not per_variant: the runner runs it for the base run
        redo = ctx.force and (spec.per_variant or ctx.variant == BASE_VARIANT)  # --force on a variant keeps it
        run_step(spec, Context(cfg=ctx.cfg, layout=ctx.layout, device=ctx.device, force=redo, progress=ctx.progress))


def outputs(ctx) -> list[Path]:
    return features.outputs(ctx) + decode.outputs(ctx) + recon.outputs(ctx)


def inputs(ctx) -> list[Path]:
    d = ctx.layout.base.data_dir
    return ([part_path(d, s, p, ctx.subject) for s in ("train", "test") for p in ("fmri", "stim")]
            + variant_files(ctx.layout))


def main(argv=None) -> int:
    from pipeline.step_entry import step_main

    return step_main(KIND, argv)
