"""Where the miniature loses an image's shape: linear probes of its CLIP features and an oracle grid.

    python -m miniature.probe                           # probe table on stdout (about a minute)
    python -m miniature.probe --unet                    # + how much the UNet reads each caption word
    python -m miniature.probe --oracle probe_oracle.png # + the UNet given exact embeddings (after make demo)

The UNet can only draw what its conditions carry, and only if it learned to read them. The probes
read shape, foreground colour, background colour and position back from each feature the UNet is
conditioned on (the vision CLS token, the 256 patch tokens, the caption-averaged text tokens) with
a logistic regression, on a fresh draw of the synthetic generator (its own seed, not the training
pool): three quarters fit, one quarter scored. A probe standardises its inputs, so it finds a
direction however faint; the variance shares say how strong each direction is in the raw features
the UNet sees, and ``--unet`` how much worse the UNet's estimate of the clean latent gets when the
caption names another shape or colour. The oracle grid then asks the second question: the
demo's test images redrawn from their *exact* CLIP embeddings, no decoding involved, with the seen
image itself as the init, for both conditions and for each alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from pipeline.config import BASE_VARIANT

ATTRIBUTES = ("shape", "fg colour", "bg colour", "position")
FEATURES = ("vision CLS", "vision patches", "text tokens")


def attribute_labels(attrs: np.ndarray) -> dict[str, np.ndarray]:
    """``draw_pool``'s attribute vectors -> one integer label per attribute (drawn images only)."""
    from prepare_data.synthetic import COLOURS, POSITIONS, SHAPES

    k, s = len(COLOURS), len(SHAPES)
    spans = {"fg colour": (0, k), "bg colour": (k, 2 * k), "shape": (2 * k, 2 * k + s),
             "position": (2 * k + s, 2 * k + s + len(POSITIONS))}
    return {name: attrs[:, a:b].argmax(1) for name, (a, b) in spans.items()}


def probe_accuracy(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Held-out accuracy of a logistic regression reading ``y`` from ``x`` (3/4 fit, 1/4 scored)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x.reshape(len(x), -1)[order], y[order]
    n = len(x) * 3 // 4
    scale = StandardScaler().fit(x[:n])
    model = LogisticRegression(max_iter=2000).fit(scale.transform(x[:n]), y[:n])
    return float(model.score(scale.transform(x[n:]), y[n:]))


def variance_shares(x: np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, float]:
    """{attribute: share of ``x``'s total variance explained by that attribute's class means}.

    A probe reads a label from any direction, however faint, once it standardises the features; a
    network fed the raw features (the UNet) learns the strong directions first. This says how
    strong each attribute's direction is: between-class sum of squares over total sum of squares
    (the R^2 of a fit on class indicators; with no signal it is about (classes - 1) / n, 0.1 % at
    the default 2,400 images)."""
    x = x.reshape(len(x), -1).astype(np.float64)
    centred = x - x.mean(0)
    total = float((centred**2).sum())
    shares = {}
    for name, y in labels.items():
        between = sum((y == k).sum() * float((centred[y == k].mean(0) ** 2).sum()) for k in np.unique(y))
        shares[name] = between / total
    return shares


def swap_attribute(caps: np.ndarray, attrs: np.ndarray, attribute: str) -> np.ndarray:
    """The captions with one attribute's word replaced by another value of it (drawn images only):
    the shape by the next shape, a colour by one that neither colour of the image has."""
    import re

    from prepare_data.synthetic import COLOURS, SHAPES

    labels, names = attribute_labels(attrs), list(COLOURS)
    out = caps.copy()
    for i in range(len(caps)):
        fg, bg = names[labels["fg colour"][i]], names[labels["bg colour"][i]]
        if attribute == "shape":
            old = SHAPES[labels["shape"][i]]
            pattern, new = rf"\b{old}\b", SHAPES[(labels["shape"][i] + 1) % len(SHAPES)]
        elif attribute in ("fg colour", "bg colour"):
            others = [c for c in names if c not in (fg, bg)]
            new = others[i % len(others)]
            # the background colour is the word before "background"; the object's is any other
            pattern = rf"\b{bg}\b(?= background)" if attribute == "bg colour" else rf"\b{fg}\b(?! background)"
        else:
            raise ValueError(f"swap_attribute: unknown attribute {attribute!r}")
        for j in range(caps.shape[1]):
            if caps[i, j]:
                out[i, j] = re.sub(pattern, new, str(caps[i, j]))
    return out


def caption_swap_sensitivity(clip, comps, attributes=("shape", "fg colour"), n: int = 240, seed: int = 123,
                             timesteps=(300, 500, 650), mix_text: float = 0.4,
                             image_size: int = 128) -> dict[str, dict[int, float]]:
    """{attribute: {t: relative increase of the UNet's x0 error}} when the text condition names
    another value of the attribute (``swap_attribute``) and everything else (the vision tokens, the
    noisy latent, the noise) stays: 0 means the UNet ignores that word, 0.3 that its estimate of
    the clean latent gets 30 % worse. Fresh synthetic images (their own seed), exact embeddings."""
    import torch
    from PIL import Image

    from models.versatile import set_dual_mixing
    from prepare_data.synthetic import draw_pool
    from reconstruct.sampling import vd_alphas_cumprod

    stim, caps, attrs = draw_pool(n, image_size, seed)
    drawn = attrs[:, -1] == 0  # photo crops have no shape or colours
    stim, caps, attrs = stim[drawn], caps[drawn], attrs[drawn]
    side = comps.vae.config.sample_size
    x = np.stack([np.asarray(Image.fromarray(s).resize((side, side), Image.Resampling.BICUBIC)) for s in stim])
    unet, ac = comps.image_unet, vd_alphas_cumprod(comps.scheduler).float()
    with torch.no_grad():
        z0 = comps.vae.encode(torch.from_numpy(x).float().permute(0, 3, 1, 2) / 127.5 - 1).latent_dist.mean
        z0 = z0 * comps.vae.config.scaling_factor
    vision = torch.from_numpy(clip.encode_images(stim, batch_size=256, progress=False)).float()
    text = {a: torch.from_numpy(clip.encode_captions_per_image(c, progress=False)).float()
            for a, c in [("exact", caps)] + [(a, swap_attribute(caps, attrs, a)) for a in attributes]}
    set_dual_mixing(unet, mix_text, text_len=text["exact"].shape[1], image_len=vision.shape[1])
    g = torch.Generator().manual_seed(seed)
    out = {a: {} for a in attributes}
    for t in timesteps:
        a_t = ac[t]
        zt = a_t.sqrt() * z0 + (1 - a_t).sqrt() * torch.randn(z0.shape, generator=g)
        steps = torch.full((len(z0),), t)
        err = {}
        for name, tc in text.items():
            with torch.no_grad():
                eps = unet(zt, steps, encoder_hidden_states=torch.cat([tc, vision], dim=1)).sample
            err[name] = float((((zt - (1 - a_t).sqrt() * eps) / a_t.sqrt() - z0) ** 2).mean())
        for name in attributes:
            out[name][int(t)] = err[name] / err["exact"] - 1
    return out


def probe_features(clip, n: int = 2400, seed: int = 123, image_size: int = 128, features=FEATURES):
    """({feature: (n_drawn, ...) array}, {attribute: labels}) on a fresh draw of the generator
    (photo crops left out: they have no shape or colours)."""
    from prepare_data.synthetic import draw_pool

    stim, caps, attrs = draw_pool(n, image_size, seed)
    drawn = attrs[:, -1] == 0
    feats = {}
    if "text tokens" in features:
        feats["text tokens"] = clip.encode_captions_per_image(caps[drawn], progress=False)
    if {"vision CLS", "vision patches"} & set(features):
        vision = clip.encode_images(stim[drawn], batch_size=256, progress=False)
        feats["vision CLS"], feats["vision patches"] = vision[:, :1], vision[:, 1:]
    return {f: feats[f] for f in features}, attribute_labels(attrs[drawn])


def probe_table(feats: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """{feature: {attribute: held-out accuracy}}, plus a ``"chance"`` row (1 / number of classes)."""
    table = {f: {a: probe_accuracy(x, labels[a]) for a in ATTRIBUTES} for f, x in feats.items()}
    table["chance"] = {a: 1 / len(np.unique(labels[a])) for a in ATTRIBUTES}
    return table


def linear_probes(clip, n: int = 2400, seed: int = 123, image_size: int = 128,
                  features=FEATURES) -> dict[str, dict[str, float]]:
    """``probe_table`` of ``features`` on ``n`` fresh images."""
    return probe_table(*probe_features(clip, n, seed, image_size, features))


def oracle_grid(results: Path, data: Path, sub: str, cfg, out: Path, seed: int = 0) -> np.ndarray:
    """Rows: seen image; img2img from the exact embeddings with both conditions, text only, vision
    only (the demo's strength, steps and guidance, the seen image at 64 px as the init)."""
    import torch
    from PIL import Image

    from models import load as load_models
    from pipeline import io
    from reconstruct.sampling import img2img

    run = results / "synthetic" / f"sub{sub}" / BASE_VARIANT / "features"
    stim = np.load(data / "synthetic" / f"sub{sub}" / f"test_stim_sub{sub}.npy")
    vision, text = np.load(run / "clipvision_test.npy"), np.load(run / "cliptext_test.npy")
    clip, comps = load_models.clip(cfg), load_models.versatile(cfg)
    size, v = cfg.vdvae_init.output_size, cfg.versatile
    seen = np.stack([np.asarray(Image.fromarray(s).resize((size, size), Image.Resampling.BICUBIC)) for s in stim])
    rows = [seen]
    for mix in (v.mix_text, 1.0, 0.0):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(stim))]
        rows.append(img2img(comps, seen, vision, text, clip.unconditional_image(), clip.unconditional_text(),
                            strength=v.strength, num_inference_steps=v.num_inference_steps,
                            guidance_scale=v.guidance_scale, mix_text=mix, generators=gens, progress=False))
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    io.save_image(out, grid)
    return grid


def _print_table(table: dict[str, dict[str, float]], fmt) -> None:
    print("| feature | " + " | ".join(ATTRIBUTES) + " |")
    print("|---|" + "---|" * len(ATTRIBUTES))
    for f, row in table.items():
        print(f"| {f} | " + " | ".join(fmt(row[x]) for x in ATTRIBUTES) + " |")


def main(argv=None) -> int:
    from miniature.report import CONFIG
    from models import load as load_models
    from pipeline.config import load_config

    p = argparse.ArgumentParser(prog="python -m miniature.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2400, help="images drawn for the probes")
    p.add_argument("--oracle", help="also write the oracle grid (needs `make demo`'s output) to this PNG")
    p.add_argument("--results", default="demo_output/results")
    p.add_argument("--data", default="demo_output/data")
    p.add_argument("--subject", default="1")
    p.add_argument("--unet", action="store_true", help="also measure how much the UNet reads the shape and "
                                                         "colour words (caption_swap_sensitivity, a minute)")
    a = p.parse_args(argv)
    cfg = load_config([CONFIG])
    clip = load_models.clip(cfg)
    feats, labels = probe_features(clip, n=a.n)
    table = probe_table(feats, labels)
    print("linear probe, held-out accuracy")
    _print_table(table, lambda v: f"{100 * v:.0f} %")
    print("\nshare of the feature's variance explained by the attribute")
    _print_table({f: variance_shares(x, labels) for f, x in feats.items()}, lambda v: f"{100 * v:.1f} %")
    if a.unet:
        sens = caption_swap_sensitivity(clip, load_models.versatile(cfg), mix_text=cfg.versatile.mix_text)
        ts = list(next(iter(sens.values())))
        print("\nUNet x0 error increase when the caption names another value (exact embeddings)")
        print("| word swapped | " + " | ".join(f"t = {t}" for t in ts) + " |")
        print("|---|" + "---|" * len(ts))
        for name, row in sens.items():
            print(f"| {name} | " + " | ".join(f"{100 * row[t]:+.1f} %" for t in ts) + " |")
    if a.oracle:
        oracle_grid(Path(a.results), Path(a.data), a.subject, cfg, Path(a.oracle))
        print(f"oracle grid (rows: seen; exact embeddings, mix_text {cfg.versatile.mix_text}; text only; "
              f"vision only): {a.oracle}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
