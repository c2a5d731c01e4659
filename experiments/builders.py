"""Variant builders: method name → ``function(layout, cfg, **params) → dict of variant arrays``.

An experiment's ``[[variants]]`` entry names a method of :data:`BUILDERS`; every parameter that is
not a ``section.key`` config override goes to the builder (checked against its signature when the
grid is expanded). A builder returns the arrays :func:`pipeline.variant.write_variant` takes
(``indices``, ``captions``, ``stim_clipvision``) and optionally ``diagnostics``. A new selection or
perturbation method is one function here and one line in :data:`BUILDERS`; ``pipeline/`` is not
touched.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import io
from pipeline.errors import UserError
from pipeline.layout import Layout


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

#: Steps of the base run whose outputs a builder reads (run for the base variant before it builds).
BASE_STEPS: dict[str, tuple[str, ...]] = {
    "diversity": ("features",),  # space = "clipvision" embeds the base CLIP-vision features
}
