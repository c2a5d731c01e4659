"""Step 2, ``features``: the regression targets of every training and test image.

* ``vdvae``: posterior samples of the first ``features.vdvae_groups`` VDVAE groups (91,168-d).
* ``cliptext``: CLIP-text 77×768, averaged over an image's first ``features.max_captions`` (5)
  non-empty captions; ``features/cliptext_<split>.captions.json`` records the choice.
* ``clipvision``: CLIP-vision 257×768.

Written as float32 ``.npy`` files filled chunk by chunk (NSD CLIP-vision train is 7 GB). For a
training-set variant only the targets the variant changes are extracted; everything else is
reused from the base run (rows selected later by the ridge step), which the runner brings up to
date first (the step's ``needs_base``).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from models import load as load_models
from pipeline import io, seeds
from pipeline.common_format import read_split
from pipeline.config import BASE_VARIANT
from pipeline.errors import UserError
from pipeline.layout import TARGETS
from pipeline.step_entry import step_main
from pipeline.variant import load_variant, variant_files

log = logging.getLogger("recon")
CHUNK = 256  # images per CLIP chunk written to disk


def _vdvae_features(model, stim, n_groups, batch_size, seed, path, progress):
    from models.vdvae import extract_latents, latent_dim

    dim = latent_dim(model.config, n_groups)
    with io.atomic_memmap(path, (len(stim), dim), np.float32) as out:
        extract_latents(model, stim, n_groups=n_groups, batch_size=batch_size, seed=seed, out=out,
                        progress=progress)


def _clip_features(encode, items, path, desc, progress):
    """Encode ``items`` chunk by chunk into a float32 memmap at ``path`` (shaped by the first chunk)."""
    first = encode(items[:CHUNK])
    with io.atomic_memmap(path, (len(items),) + tuple(first.shape[1:]), np.float32) as out:
        out[: len(first)] = first
        for start in tqdm(range(CHUNK, len(items), CHUNK), desc=desc, disable=not progress or len(items) <= CHUNK,
                          unit="chunk"):
            out[start:start + CHUNK] = encode(items[start:start + CHUNK])


def first_captions(cap: np.ndarray, max_captions: int) -> np.ndarray:
    """Each row's first ``max_captions`` non-empty captions, in order, '' padded (0 = keep all).

    The common format keeps every caption (COCO has 5-7 per image); Brain-Diffuser averages the
    curated file's 5, i.e. the first 5 of the annotation file.
    """
    from models.clip import caption_mask

    if max_captions < 0:
        raise UserError(f"features.max_captions = {max_captions}: expected >= 0 (0 = all captions)")
    cap = np.asarray(cap)
    present = caption_mask(cap)
    width = int(present.sum(axis=1).max(initial=0))
    if max_captions:
        width = min(width, max_captions)
    out = np.full((len(cap), max(width, 1)), "", dtype=cap.dtype)
    for i, (row, keep) in enumerate(zip(cap, present)):
        chosen = row[keep][:width]
        out[i, :len(chosen)] = chosen
    return out


def _record_captions(path: Path, cap: np.ndarray, chosen: np.ndarray, max_captions: int) -> None:
    """``cliptext_<split>.captions.json`` beside the features: which captions were encoded."""
    from models.clip import caption_mask

    have, used = caption_mask(cap).sum(axis=1), caption_mask(chosen).sum(axis=1)
    io.save_json(path.with_suffix(".captions.json"), {
        "max_captions": int(max_captions), "rule": "first non-empty captions in the common format's order",
        "n_images": int(len(cap)), "captions_available": int(have.sum()), "captions_encoded": int(used.sum()),
        "images_with_more_than_encoded": int((have > used).sum()),
        "encoded_per_image": {str(k): int(v) for k, v in zip(*np.unique(used, return_counts=True))}})


def _encode_captions(clip, cap, path, desc, cfg, progress) -> None:
    chosen = first_captions(cap, cfg.features.max_captions)
    _clip_features(lambda c: clip.encode_captions_per_image(c, batch_size=cfg.features.clip_batch_size), chosen,
                   path, desc, progress)
    _record_captions(path, cap, chosen, cfg.features.max_captions)


def _warn_missing_captions(cap: np.ndarray, split: str) -> None:
    from models.clip import images_without_captions

    empty = int(np.count_nonzero(images_without_captions(cap)))
    if empty:
        log.warning("[features] %d %s images have no caption; their CLIP-text target is the empty-text "
                    "embedding", empty, split)


def run(ctx) -> None:
    cfg, layout, f = ctx.cfg, ctx.layout, ctx.cfg.features
    if ctx.variant != BASE_VARIANT:
        _run_variant(ctx)
        return
    splits = {s: read_split(layout.data_dir, s, ctx.subject, parts=("stim", "cap")) for s in ("train", "test")}

    def todo(target):  # a resumed run keeps the target files it already finished
        return [s for s in splits if not (ctx.resume and layout.features(target, s).is_file())]

    if todo("vdvae"):
        model = load_models.vdvae(cfg, ctx.device)
        for split in todo("vdvae"):
            _vdvae_features(model, splits[split].stim, f.vdvae_groups, f.vdvae_batch_size,
                            seeds.vdvae_posterior(cfg, split),
                            layout.features("vdvae", split), ctx.progress)
        del model
    if not (todo("cliptext") or todo("clipvision")):
        return
    clip = load_models.clip(cfg, ctx.device)
    for split in todo("cliptext"):
        _warn_missing_captions(splits[split].cap, split)
        _encode_captions(clip, splits[split].cap, layout.features("cliptext", split), f"CLIP-text {split}", cfg,
                         ctx.progress)
    for split in todo("clipvision"):
        _clip_features(lambda s: clip.encode_images(s, batch_size=f.clip_batch_size), splits[split].stim,
                       layout.features("clipvision", split), f"CLIP-vision {split}", ctx.progress)


def _run_variant(ctx) -> None:
    """Extract only what the variant changes (the base features exist: the runner ran them first)."""
    n_train = io.load_npy(ctx.layout.base.features("vdvae", "train"), mmap_mode="r").shape[0]
    variant = load_variant(ctx.layout, n_train)
    if not variant.changed_targets():
        return
    clip = load_models.clip(ctx.cfg, ctx.device)
    bs = ctx.cfg.features.clip_batch_size
    if variant.captions is not None:
        _warn_missing_captions(variant.captions, "train")
        _encode_captions(clip, variant.captions, ctx.layout.features("cliptext", "train"),
                         "CLIP-text train (variant)", ctx.cfg, ctx.progress)
    if variant.stim_clipvision is not None:
        # perturbation sets are already CLIP inputs (224 px): no 512 px detour that would blur them
        _clip_features(lambda s: clip.encode_images(s, batch_size=bs, reference_resize=False), variant.stim_clipvision,
                       ctx.layout.features("clipvision", "train"), "CLIP-vision train (variant)", ctx.progress)


def outputs(ctx) -> list[Path]:
    if ctx.variant == BASE_VARIANT:
        return [ctx.layout.features(t, s) for t in TARGETS for s in ("train", "test")]
    variant = load_variant(ctx.layout)
    return [ctx.layout.features(t, "train") for t in variant.changed_targets()]


def inputs(ctx) -> list[Path]:
    from pipeline.common_format import part_path

    d = ctx.layout.base.data_dir
    paths = [part_path(d, s, p, ctx.subject) for s in ("train", "test") for p in ("stim", "cap")]
    return paths + variant_files(ctx.layout)


def train_target_path(layout, target: str) -> Path:
    """The training-target file of ``layout``'s variant: its own re-extracted one, else the base run's."""
    own = layout.features(target, "train")
    return own if (layout.variant != BASE_VARIANT and own.is_file()) else layout.base.features(target, "train")


def train_targets(layout, target: str, mmap: bool = True) -> np.ndarray:
    """Training targets of ``target`` for ``layout``'s variant, before row selection."""
    path = train_target_path(layout, target)
    if not path.is_file():
        raise UserError(f"{path}: file not found (run the features step first)")
    return io.load_npy(path, mmap_mode="r" if mmap else None)


def main(argv=None) -> int:
    return step_main("features", argv)


if __name__ == "__main__":
    sys.exit(main())
