"""Where the miniature loses an image's shape: linear probes of its CLIP features and an oracle grid.

    python -m miniature.probe                           # probe table on stdout (about a minute)
    python -m miniature.probe --oracle probe_oracle.png # + the UNet given exact embeddings (after make demo)

The UNet can only draw what its conditions carry, and only if it learned to read them. The probes
read shape, foreground colour, background colour and position back from each feature the UNet is
conditioned on (the vision CLS token, the 256 patch tokens, the caption-averaged text tokens) with
a logistic regression, on a fresh draw of the synthetic generator (its own seed, not the training
pool): three quarters fit, one quarter scored. The oracle grid then asks the second question: the
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


def linear_probes(clip, n: int = 2400, seed: int = 123, image_size: int = 128,
                  features=FEATURES) -> dict[str, dict[str, float]]:
    """{feature: {attribute: held-out accuracy}} for each of ``features``, plus a ``"chance"`` row
    (1 / number of classes)."""
    from prepare_data.synthetic import draw_pool

    stim, caps, attrs = draw_pool(n, image_size, seed)
    drawn = attrs[:, -1] == 0  # photo crops have no shape or colours
    feats = {}
    if "text tokens" in features:
        feats["text tokens"] = clip.encode_captions_per_image(caps[drawn], progress=False)
    if {"vision CLS", "vision patches"} & set(features):
        vision = clip.encode_images(stim[drawn], batch_size=256, progress=False)
        feats["vision CLS"], feats["vision patches"] = vision[:, :1], vision[:, 1:]
    labels = attribute_labels(attrs[drawn])
    table = {f: {a: probe_accuracy(feats[f], labels[a]) for a in ATTRIBUTES} for f in features}
    table["chance"] = {a: 1 / len(np.unique(labels[a])) for a in ATTRIBUTES}
    return table


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
    a = p.parse_args(argv)
    cfg = load_config([CONFIG])
    table = linear_probes(load_models.clip(cfg), n=a.n)
    print("| feature | " + " | ".join(ATTRIBUTES) + " |")
    print("|---|" + "---|" * len(ATTRIBUTES))
    for f, row in table.items():
        print(f"| {f} | " + " | ".join(f"{100 * row[x]:.0f} %" for x in ATTRIBUTES) + " |")
    if a.oracle:
        oracle_grid(Path(a.results), Path(a.data), a.subject, cfg, Path(a.oracle))
        print(f"oracle grid (rows: seen; exact embeddings, mix_text {cfg.versatile.mix_text}; text only; "
              f"vision only): {a.oracle}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
