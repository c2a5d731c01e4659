"""Friendly / adversarial perturbations of training images against the CLIP image encoder
(prior-art.md §3c, Experiment 3).

The perturbed copies replace the images CLIP-vision sees in training (``method = "perturbed"``
variants); VDVAE and CLIP-text keep the original data, so only the CLIP-vision pathway changes.

Objective: minimise the cosine distance ``d(x) = 1 − cos(E_img(x), E_txt(caption))`` between
the perturbed image's CLIP embedding (``image_embeds``: post-LayerNorm class token through the
visual projection) and the CLIP-text embedding of a target caption (``text_embeds``: the pooled
end-of-text state through the text projection).

* Target: ``friendly`` = the image's own caption n for copy n (cycling through its captions when
  it has fewer than ``copies``); ``adversarial`` = a random caption of a random *other* captioned
  image, drawn with ``numpy.random.default_rng(seed)`` for all (image, copy) pairs up front.
* ``x`` is the CLIP-preprocessed image in [0, 1] (the pipeline's pixel path: 512 px reference
  resize and uint8 round trip, shortest-side bicubic resize and centre crop to S = 224 px), before
  the CLIP mean/std normalisation, which is applied inside the objective.
* ``fgsm``: one step ``x ← clip(x − ε·sign(∇d), 0, 1)``; ε ∈ {0, 0.01, 0.03, 0.05, 0.1}
  (ε = 0 is the unperturbed baseline; the study chose 0.03).
* ``iterative`` ("IC"): raw-gradient steps ``x ← clip(x − lr·∇d, 0, 1)`` with lr 3 for steps
  0–49, 2 for 50–99, 1.5 for 100–299 and 1 from 300 on, at most 500 steps. Criterion "a-b"
  stops an image as soon as ``dist_to_initial / dist_to_caption > b / a``, where both are cosine
  distances of the *current* image embedding: to the embedding of the unperturbed image and to the
  target caption's embedding. For an embedding moving on the line from the image (t = 0) to the
  caption (t = 1) the ratio is t / (1 − t), so "a-b" means "stop once it is a % image, b %
  caption": 80-20 (the study's choice) stops after 20 % of the way; 50-50 halfway.

Outputs (pickle-free): ``<out>.npy`` uint8 (n_train, copies, S, S, 3), ``<out>_ids.npy`` (the
training ids, same row order), ``<out>_stats.npy`` float32 (n_train, copies, 4) = [distance to the
caption before, after (on the saved uint8 image), steps taken, criterion reached (1/0; NaN for
FGSM)], and ``<out>.json`` (parameters and summary). Work is saved per chunk of images in
``<out>.parts/`` so a killed run resumes; the chunks are removed once ``<out>.npy`` is complete.

    python -m adv_pert.perturb --data-dir data --dataset deeprecon --subject AM \\
        --mode friendly --method fgsm --eps 0.03 --copies 5 --out data/deeprecon/adv_pert/friendly_fgsm_0.03
"""
from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline import io
from pipeline.errors import UserError
from pipeline.variant import rows_for_ids

log = logging.getLogger("recon")
MODES = ("friendly", "adversarial")
METHODS = ("fgsm", "iterative")
EPSILONS = (0.0, 0.01, 0.03, 0.05, 0.1)  # the study's FGSM grid
DEFAULT_EPS = 0.03
CRITERIA = {"90-10": (90, 10), "80-20": (80, 20), "70-30": (70, 30), "50-50": (50, 50)}
DEFAULT_CRITERION = "80-20"
LR_SCHEDULE = ((0, 3.0), (50, 2.0), (100, 1.5), (300, 1.0))  # (first step, learning rate)
MAX_STEPS = 500
DEFAULT_COPIES = 5
STATS = ("dist_before", "dist_after", "steps", "reached")


# ---------------------------------------------------------------------------------------------
# the objective


class CLIPObjective:
    """CLIP image/text embeddings for perturbation: differentiable in the [0, 1] pixel input."""

    def __init__(self, embedder, reference_resize: bool = True):
        self.embedder = embedder
        self.reference_resize = reference_resize
        proc = embedder.image_processor
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(proc.image_mean, dtype=torch.float32).view(shape).to(embedder.device)
        self.std = torch.tensor(proc.image_std, dtype=torch.float32).view(shape).to(embedder.device)

    @property
    def device(self) -> torch.device:
        return self.embedder.device

    def clip_input(self, images) -> torch.Tensor:
        """uint8 (n, H, W, 3) → float32 (n, 3, S, S) in [0, 1] on the device: the pixels CLIP sees in the
        pipeline (models.clip.CLIPEmbedder.pixel_values) before mean/std normalisation."""
        from models.clip import reference_image

        pils = [reference_image(np.asarray(im), self.reference_resize) for im in images]
        px = self.embedder.image_processor(images=pils, return_tensors="pt", do_normalize=False).pixel_values
        return px.to(self.device, torch.float32)

    def image_embeds(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) in [0, 1] → unit-norm (n, D) projected class-token embeddings (keeps the graph)."""
        px = ((x - self.mean) / self.std).to(self.embedder.dtype)
        e = self.embedder.vision_model(pixel_values=px).image_embeds.float()
        return e / e.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeds(self, captions: Sequence[str]) -> torch.Tensor:
        """captions → unit-norm (n, D) projected pooled text embeddings."""
        ids = self.embedder.tokenize(list(captions)).to(self.device)
        e = self.embedder.text_model(input_ids=ids).text_embeds.float()
        return e / e.norm(dim=-1, keepdim=True)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise 1 − cos for unit-norm (n, D) rows → (n,)."""
    return 1.0 - (a * b).sum(dim=-1)


def quantise(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats → the values a uint8 image stores (round to the nearest of 256 levels)."""
    return torch.round(x.clamp(0, 1) * 255) / 255


# ---------------------------------------------------------------------------------------------
# solvers: (objective, x (n,3,S,S) in [0,1], target (n,D)) → perturbed x, steps (n,), reached (n,)


def fgsm(obj: CLIPObjective, x: torch.Tensor, target: torch.Tensor, eps: float = DEFAULT_EPS):
    """One signed-gradient step of size ``eps`` towards the target; ``eps = 0`` returns ``x``."""
    n = len(x)
    if eps == 0:
        return x.clone(), torch.zeros(n, dtype=torch.int64), torch.full((n,), float("nan"))
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(cosine_distance(obj.image_embeds(xg), target).sum(), xg)
    return (x - eps * grad.sign()).clamp(0, 1).detach(), torch.ones(n, dtype=torch.int64), torch.full((n,), float("nan"))


def learning_rate(step: int, schedule: Sequence[tuple[int, float]] = LR_SCHEDULE) -> float:
    """The rate of ``step`` (0-based) under a piecewise-constant schedule of (first step, rate)."""
    lr = schedule[0][1]
    for start, rate in schedule:
        if step >= start:
            lr = rate
    return lr


def parse_criterion(criterion: str) -> tuple[int, int]:
    """'80-20' → (80, 20); any 'a-b' with positive integers is accepted."""
    try:
        a, b = (int(v) for v in str(criterion).split("-"))
        if a <= 0 or b <= 0:
            raise ValueError
    except ValueError:
        raise UserError(f"criterion {criterion!r}: expected 'a-b' with positive integers, e.g. "
                        f"{', '.join(CRITERIA)}") from None
    return a, b


def iterative(obj: CLIPObjective, x: torch.Tensor, target: torch.Tensor, criterion: str = DEFAULT_CRITERION,
              max_steps: int = MAX_STEPS, schedule: Sequence[tuple[int, float]] = LR_SCHEDULE):
    """Raw-gradient descent on d until ``a·dist_to_initial > b·dist_to_caption`` (per image), at most
    ``max_steps`` steps. The criterion is checked before every step, so an image stops at the first
    iterate that meets it. Returns (x, steps (n,), reached (n,) as 1/0 floats)."""
    a, b = parse_criterion(criterion)
    n = len(x)
    x = x.detach().clone()
    steps = torch.zeros(n, dtype=torch.int64)
    reached = torch.zeros(n)
    with torch.no_grad():
        e0 = obj.image_embeds(x)
    idx = torch.arange(n, device=x.device)
    with torch.enable_grad():
        for step in range(max_steps + 1):
            xa = x[idx].requires_grad_(True)
            e = obj.image_embeds(xa)
            d_cap = cosine_distance(e, target[idx])
            d_init = cosine_distance(e, e0[idx])
            done = (a * d_init > b * d_cap).detach()
            reached[idx[done].cpu()] = 1.0
            keep = ~done
            if step == max_steps or not bool(keep.any()):
                break
            (grad,) = torch.autograd.grad(d_cap[keep].sum(), xa)
            lr = learning_rate(step, schedule)
            x[idx[keep]] = (xa[keep] - lr * grad[keep]).clamp(0, 1).detach()
            steps[idx[keep].cpu()] += 1
            idx = idx[keep]
    return x, steps, reached


SOLVERS = {"fgsm": fgsm, "iterative": iterative}


# ---------------------------------------------------------------------------------------------
# targets and whole arrays


def choose_targets(captions: np.ndarray, mode: str, copies: int, seed: int = 0) -> np.ndarray:
    """(n, n_cap) captions ('' = missing) → (n, copies) target captions ('' = no target: not perturbed).

    friendly: copy c of image i targets caption c of i (cycling over its present captions);
    adversarial: a random present caption of a random other captioned image (seeded).
    """
    caps = np.asarray(captions)
    if caps.dtype.kind != "U" or caps.ndim != 2:
        raise UserError(f"captions: expected a unicode (n_images, n_captions) array, got {caps.dtype} {caps.shape}")
    if mode not in MODES:
        raise UserError(f"mode {mode!r}: expected one of {MODES}")
    present = [[str(c) for c in row if str(c).strip()] for row in caps]
    n = len(caps)
    out = np.full((n, copies), "", dtype=caps.dtype)
    if mode == "friendly":
        for i, row in enumerate(present):
            for c in range(copies):
                out[i, c] = row[c % len(row)] if row else ""
        return out
    rng = np.random.default_rng(seed)
    donors = np.array([i for i, row in enumerate(present) if row], dtype=np.int64)
    for i in range(n):
        others = donors[donors != i]
        for c in range(copies):
            if len(others) == 0:
                continue
            j = int(others[rng.integers(len(others))])
            out[i, c] = present[j][rng.integers(len(present[j]))]
    return out


def perturb_images(obj: CLIPObjective, images, targets: np.ndarray, method: str = "fgsm", eps: float = DEFAULT_EPS,
                   criterion: str = DEFAULT_CRITERION, max_steps: int = MAX_STEPS,
                   schedule: Sequence[tuple[int, float]] = LR_SCHEDULE, batch_size: int = 16):
    """uint8 (k, H, W, 3) images and (k, copies) target captions → uint8 (k, copies, S, S, 3) perturbed
    CLIP inputs and float32 (k, copies, 4) stats (:data:`STATS`). Copies without a target ('') are
    the unperturbed CLIP input."""
    if method not in SOLVERS:
        raise UserError(f"method {method!r}: expected one of {METHODS}")
    k, copies = targets.shape
    x0 = obj.clip_input(images)
    S = x0.shape[-1]
    out = np.empty((k, copies, S, S, 3), dtype=np.uint8)
    stats = np.full((k, copies, len(STATS)), np.nan, dtype=np.float32)
    items = [(i, c) for i in range(k) for c in range(copies)]
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        rows = torch.tensor([i for i, _ in batch], device=obj.device)
        x = x0[rows]
        texts = [str(targets[i, c]) for i, c in batch]
        has = torch.tensor([bool(t.strip()) for t in texts], device=obj.device)
        if bool(has.any()):
            sel = torch.nonzero(has).flatten()
            t = obj.text_embeds([texts[j] for j in sel.tolist()])
            with torch.no_grad():
                before = cosine_distance(obj.image_embeds(x[sel]), t)
            if method == "fgsm":
                xs, steps, reached = fgsm(obj, x[sel], t, eps)
            else:
                xs, steps, reached = iterative(obj, x[sel], t, criterion, max_steps, schedule)
            xs = quantise(xs)
            with torch.no_grad():
                after = cosine_distance(obj.image_embeds(xs), t)
            x = x.clone()
            x[sel] = xs
            for j, m in enumerate(sel.tolist()):
                i, c = batch[m]
                stats[i, c] = (before[j].item(), after[j].item(), steps[j].item(), reached[j].item())
        imgs = torch.round(x.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for j, (i, c) in enumerate(batch):
            out[i, c] = imgs[j]
    return out, stats


# ---------------------------------------------------------------------------------------------
# files


def _base(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix == ".npy" else path


def output_paths(out: str | os.PathLike) -> dict[str, Path]:
    """The files of a perturbation set ``<out>`` (with or without ``.npy``)."""
    b = _base(out)
    return {"images": b.with_name(b.name + ".npy"), "ids": b.with_name(b.name + "_ids.npy"),
            "stats": b.with_name(b.name + "_stats.npy"), "info": b.with_name(b.name + ".json"),
            "parts": b.with_name(b.name + ".parts")}


def perturb_dataset(obj: CLIPObjective, images, ids: np.ndarray, captions: np.ndarray, out: str | os.PathLike, *,
                    mode: str = "friendly", method: str = "fgsm", eps: float = DEFAULT_EPS,
                    criterion: str = DEFAULT_CRITERION, copies: int = DEFAULT_COPIES, seed: int = 0,
                    max_steps: int = MAX_STEPS, batch_size: int = 16, chunk_size: int = 64,
                    progress: bool = True, extra_info: dict | None = None) -> Path:
    """Perturb every training image ``copies`` times and write the files of :func:`output_paths`.

    images: uint8 (n, H, W, 3); ids (n,); captions (n, n_cap). Resumable per chunk of ``chunk_size``
    images; a finished set with the same parameters is left as is. Returns the ``.npy`` path.
    """
    if mode not in MODES:
        raise UserError(f"mode {mode!r}: expected one of {MODES}")
    if method not in METHODS:
        raise UserError(f"method {method!r}: expected one of {METHODS}")
    if not 0 <= eps <= 1:
        raise UserError(f"eps {eps}: expected a value in [0, 1] (pixel range)")
    parse_criterion(criterion)
    if copies < 1 or chunk_size < 1 or batch_size < 1 or max_steps < 0:
        raise UserError("copies, chunk_size and batch_size must be >= 1 and max_steps >= 0")
    n = len(images)
    if n == 0:
        raise UserError("no training images to perturb")
    if len(ids) != n or len(captions) != n:
        raise UserError(f"images ({n}), ids ({len(ids)}) and captions ({len(captions)}) differ in length")
    paths = output_paths(out)
    params = {"mode": mode, "method": method, "copies": int(copies), "seed": int(seed), "n_images": n,
              "reference_resize": obj.reference_resize, "model": type(obj.embedder.vision_model).__name__,
              "image_size": int(obj.embedder.vision_model.config.image_size),
              "projection_dim": int(obj.embedder.dim)}
    if method == "fgsm":
        params["eps"] = float(eps)
    else:
        params.update(criterion=criterion, max_steps=int(max_steps), lr_schedule=[list(s) for s in LR_SCHEDULE])
    params.update(extra_info or {})
    if paths["images"].is_file() and paths["info"].is_file():
        if io.load_json(paths["info"]).get("params") == params:
            log.info("[adv_pert] %s is complete", paths["images"])
            return paths["images"]
        raise UserError(f"{paths['images']}: exists with other parameters (see {paths['info'].name}); "
                        "choose another --out or delete it")
    targets = choose_targets(captions, mode, copies, seed)
    no_target = int(np.count_nonzero(np.char.str_len(np.char.strip(targets)) == 0))
    if no_target:
        log.warning("[adv_pert] %d of %d (image, copy) pairs have no target caption and stay unperturbed",
                    no_target, targets.size)
    parts = paths["parts"]
    if (parts / "params.json").is_file() and io.load_json(parts / "params.json") != params:
        raise UserError(f"{parts}: partial results of a run with other parameters; delete the folder or "
                        "choose another --out")
    io.save_json(parts / "params.json", params)
    starts = list(range(0, n, chunk_size))
    for start in tqdm(starts, desc=f"perturb {mode} {method}", unit="chunk", disable=not progress):
        stop = min(start + chunk_size, n)
        img_part, stat_part = parts / f"chunk_{start:07d}.npy", parts / f"chunk_{start:07d}_stats.npy"
        if img_part.is_file() and stat_part.is_file():
            continue
        imgs, stats = perturb_images(obj, np.asarray(images[start:stop]), targets[start:stop], method, eps,
                                     criterion, max_steps, LR_SCHEDULE, batch_size)
        io.save_npy(stat_part, stats)
        io.save_npy(img_part, imgs)
    # assemble: images last-but-one, the JSON sidecar last (its presence marks a finished set)
    first = io.load_npy(parts / f"chunk_{0:07d}.npy", mmap_mode="r")
    all_stats = np.concatenate([io.load_npy(parts / f"chunk_{s:07d}_stats.npy") for s in starts])
    with io.atomic_memmap(paths["images"], (n,) + first.shape[1:], np.uint8) as arr:
        for s in starts:
            chunk = io.load_npy(parts / f"chunk_{s:07d}.npy", mmap_mode="r")
            arr[s:s + len(chunk)] = chunk
    io.save_npy(paths["ids"], np.asarray(ids))
    io.save_npy(paths["stats"], all_stats)
    io.save_json(paths["info"], {"params": params, "summary": summarise(all_stats),
                                 "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                 "files": {k: p.name for k, p in paths.items() if k != "parts"}})
    shutil.rmtree(parts)
    return paths["images"]


def summarise(stats: np.ndarray) -> dict:
    """Means over perturbed (image, copy) pairs of the :data:`STATS` columns."""
    ok = ~np.isnan(stats[..., 0])
    out = {"perturbed_pairs": int(ok.sum())}
    for j, name in enumerate(STATS):
        col = stats[..., j][ok]
        col = col[~np.isnan(col)]
        out[f"mean_{name}"] = float(col.mean()) if col.size else None
    return out


def load_perturbed(path: Path, ids: np.ndarray, copy: int) -> np.ndarray:
    """Copy ``copy`` of a perturbation set, rows in the order of ``ids``: uint8 (len(ids), S, S, 3)."""
    paths = output_paths(path)
    arr = io.load_npy(paths["images"], mmap_mode="r")
    file_ids = io.load_npy(paths["ids"])
    if arr.dtype != np.uint8 or arr.ndim != 5 or arr.shape[-1] != 3:
        raise UserError(f"{paths['images']}: expected uint8 (n_images, copies, H, W, 3), got {arr.dtype} {arr.shape}")
    if file_ids.ndim != 1 or len(file_ids) != arr.shape[0]:
        raise UserError(f"{paths['ids']}: expected {arr.shape[0]} ids, got shape {file_ids.shape}")
    if not 0 <= copy < arr.shape[1]:
        raise UserError(f"{paths['images']}: copy {copy} requested, the file holds copies 0..{arr.shape[1] - 1}")
    rows = rows_for_ids(file_ids, ids, paths["ids"], paths["images"], "perturbed image")
    return np.ascontiguousarray(arr[rows, copy])


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    from pipeline.cli import build_parser as shared
    from pipeline.config import DATASET_NAMES

    p = shared(None, prog="python -m adv_pert.perturb", steps=False)
    p.description = __doc__.split("\n\n")[0]
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    p.add_argument("--mode", required=True, choices=MODES)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--eps", type=float, default=DEFAULT_EPS, help=f"FGSM step (study grid {EPSILONS})")
    p.add_argument("--criterion", default=DEFAULT_CRITERION, help=f"iterative stop rule, one of {list(CRITERIA)}")
    p.add_argument("--max-steps", type=int, default=MAX_STEPS)
    p.add_argument("--copies", type=int, default=DEFAULT_COPIES)
    p.add_argument("--seed", type=int, default=None, help="adversarial target draw (default: run.seed)")
    p.add_argument("--batch-size", type=int, default=16, help="(image, copy) pairs per forward/backward pass")
    p.add_argument("--chunk-size", type=int, default=64, help="images per saved (resumable) chunk")
    p.add_argument("--out", required=True, help="output path <out>[.npy]")
    return p


def main(argv: Iterable[str] | None = None) -> int:
    from models import load as load_models
    from pipeline.cli import config_from_args, guarded, setup_logging
    from pipeline.common_format import read_split, subject_dir
    from pipeline import seeds
    from pipeline.runner import resolve_device

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    setup_logging(args.debug)

    def go():
        if not args.subject or len(args.subject) != 1:
            raise UserError("--subject: give exactly one subject (the training images are shared; ids travel with the output)")
        cfg = config_from_args(args, args.dataset)
        subject = args.subject[0]
        data = read_split(subject_dir(Path(cfg.paths.data_dir).expanduser(), args.dataset, subject), "train",
                          subject, parts=("stim", "cap", "ids"))
        device = resolve_device(cfg.run.device)
        obj = CLIPObjective(load_models.clip(cfg, device))
        path = perturb_dataset(obj, data.stim, data.ids, data.cap, args.out, mode=args.mode, method=args.method,
                               eps=args.eps, criterion=args.criterion, copies=args.copies,
                               seed=seeds.tool_seed(cfg) if args.seed is None else args.seed, max_steps=args.max_steps,
                               batch_size=args.batch_size, chunk_size=args.chunk_size,
                               progress=not args.no_progress,
                               extra_info={"dataset": args.dataset, "subject": subject,
                                           "tiny_models": cfg.run.tiny_models})
        print(path)

    return guarded(go, args.debug)


if __name__ == "__main__":
    sys.exit(main())
