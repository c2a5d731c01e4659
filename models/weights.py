"""``make weights``: every real weight file the pipeline loads, where it lives and where it comes from.

    python -m models.weights --weights-dir weights --dry-run    # what is missing, and sizes
    python -m models.weights --weights-dir weights              # fetch what is missing (resumable)
    python -m models.weights --only vdvae clip                  # a subset
    python -m models.weights --weights-dir weights --check      # load each with the pipeline's loaders

Files land at the paths the config expects by default (``[models]``, ``[icnn]`` and the evaluation
networks' file names; the iCNN archives are unpacked there), so no path needs editing afterwards.
Downloads resume from ``.part`` files and a file appears only when complete and, where the source
publishes a digest, when it matches (``pipeline.http``, the same transport as the NSD downloader).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.errors import UserError
from pipeline.http import RemoteFile, download

HF = "https://huggingface.co/{repo}/resolve/main/{file}"
VDVAE_URL = ("https://openaipublic.blob.core.windows.net/very-deep-vaes-assets/vdvae-assets-2/"
             "imagenet64-iter-1600000-model-ema.th")

CLIP_REPO = "openai/clip-vit-large-patch14"
CLIP_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
              "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")

VD_REPO = "shi-labs/versatile-diffusion"
# The hub's diffusers folders hold only the .bin form for these three (about 335 MB, 3.44 GB and
# 6.84 GB; there is no .safetensors there); diffusers reads them with torch.load(weights_only=True),
# which refuses anything but tensors.
VD_FILES = ("model_index.json", "scheduler/scheduler_config.json",
            "vae/config.json", "vae/diffusion_pytorch_model.bin",
            "image_unet/config.json", "image_unet/diffusion_pytorch_model.bin",
            "text_unet/config.json", "text_unet/diffusion_pytorch_model.bin")
# The original (non-diffusers) fp16 checkpoint the reference scripts load, for fidelity checks only
# (never loaded by the pipeline; opt in with --only vd_reference). The hub publishes its size and LFS
# sha256; only the sha256's first digits (b7814655) are recorded here, so that prefix is what is verified.
VD_REFERENCE = RemoteFile("versatile-diffusion/pretrained_pth/vd-four-flow-v1-0-fp16-deprecated.pth",
                          size=6_664_692_139, sha256="b7814655",
                          url=HF.format(repo=VD_REPO, file="pretrained_pth/vd-four-flow-v1-0-fp16-deprecated.pth"))

FIGSHARE = "https://figshare.com/ndownloader/files/{id}"
#: The Kamitani lab's PyTorch conversions (ids and md5s from brain-decoding-cookbook's data/files.json),
#: unpacked into the paths the [icnn] defaults expect.
ICNN_ARCHIVES = (
    RemoteFile("icnn/VGG_ILSVRC_19_layers.zip", url=FIGSHARE.format(id=38225868),
               md5="49f4d6dbf1024f33149352dfd309dc4d",
               unpack=(("VGG_ILSVRC_19_layers/VGG_ILSVRC_19_layers.pt", "icnn/vgg19.pt"),)),
    RemoteFile("icnn/bvlc_reference_caffenet_generator_ILSVRC2012_Training.zip", url=FIGSHARE.format(id=38361230),
               md5="bf9d4de43782cb019de733ed7cf84926",
               unpack=(("bvlc_reference_caffenet_generator_ILSVRC2012_Training/generator_relu7.pt",
                        "icnn/generator_relu7.pt"),
                       ("act_range/3x/relu7.txt", "icnn/generator_relu7_act_range_3x.txt"))),
)
GROUPS = ("vdvae", "clip", "versatile", "eval", "icnn", "vd_reference")
DEFAULT_GROUPS = ("vdvae", "clip", "versatile", "eval", "icnn")


def groups(models_cfg=None) -> dict[str, list[RemoteFile]]:
    """Weight groups → files (keys relative to ``weights_dir``) with their URLs and published digests
    (torchvision's file names carry their sha256's first digits; the lab publishes md5s)."""
    from models.eval_networks import WEIGHT_FILES
    from pipeline.config import ModelsConfig

    m = models_cfg or ModelsConfig()
    return {
        "vdvae": [RemoteFile(m.vdvae, url=VDVAE_URL)],
        "clip": [RemoteFile(f"{m.clip}/{f}", url=HF.format(repo=CLIP_REPO, file=f)) for f in CLIP_FILES],
        "versatile": [RemoteFile(f"{m.versatile}/{f}", url=HF.format(repo=VD_REPO, file=f)) for f in VD_FILES],
        "eval": [RemoteFile(w.filename, url=w.url, sha256=w.sha256 or w.sha256_prefix) for w in WEIGHT_FILES.values()],
        "icnn": list(ICNN_ARCHIVES),
        "vd_reference": [VD_REFERENCE],
    }


def check(weights_dir: Path, only=None, device: str = "cpu") -> list[tuple[str, str]]:
    """Load every model with the pipeline's own loaders: [(group, 'ok: …' or the error line)]."""
    from pipeline.config import load_config

    cfg = load_config([], [f"paths.weights_dir={weights_dir}"])
    out = []

    def attempt(name, fn):
        if only and name not in only:
            return
        try:
            out.append((name, "ok: " + fn()))
        except UserError as exc:
            out.append((name, str(exc)))

    def vdvae():
        from models import load

        model = load.vdvae(cfg, device)
        return f"{sum(p.numel() for p in model.parameters()):,} parameters loaded strictly"

    def clip():
        from models import load

        emb = load.clip(cfg, device)
        return f"text {tuple(emb.encode_text(['a photo']).shape)}, vision {emb.n_image_tokens} tokens"

    def versatile():
        from models import load

        comps = load.versatile(cfg, device)
        return f"image UNet with {sum(p.numel() for p in comps.image_unet.parameters()):,} parameters (dual attention)"

    def evaluation():
        from models.eval_networks import load_eval_networks

        return ", ".join(load_eval_networks(weights_dir, device))

    def icnn():
        from models.icnn import load_icnn_models

        m = load_icnn_models(cfg, device)
        n = sum(p.numel() for net in (m.encoder, m.generator) for p in net.parameters())
        bound = "with" if m.upper_bound is not None else "without"
        return f"VGG19 + relu7 generator, {n:,} parameters loaded strictly, {bound} the code bound"

    for name, fn in (("vdvae", vdvae), ("clip", clip), ("versatile", versatile), ("eval", evaluation),
                     ("icnn", icnn)):
        if name == "icnn" and not only and not cfg.resolve_path(cfg.icnn.vgg19, "weights_dir").exists():
            continue  # the iCNN baseline is optional: checked when named or when its weights are there
        attempt(name, fn)
    return out


def main(argv=None) -> int:
    from pipeline.cli import OneLineParser, guarded

    p = OneLineParser(prog="python -m models.weights", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights-dir", default=os.environ.get("WEIGHTS_DIR", "weights"))
    p.add_argument("--only", nargs="+", choices=GROUPS, default=None,
                   help=f"groups to fetch (default: {' '.join(DEFAULT_GROUPS)}; vd_reference only on request)")
    p.add_argument("--dry-run", action="store_true", help="list files, sizes and what is present")
    p.add_argument("--check", action="store_true", help="load every model from weights-dir and report")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)

    def go():
        if args.check:
            results = check(Path(args.weights_dir), args.only, args.device)
            for name, line in results:
                print(f"{name:<10} {line}")
            bad = [name for name, line in results if not line.startswith("ok: ")]
            if bad:
                raise UserError(f"{args.weights_dir}: {len(bad)} model(s) not loadable: {', '.join(bad)}")
            return
        chosen = groups()
        wanted = args.only or DEFAULT_GROUPS
        files = [f for name, fs in chosen.items() if name in wanted for f in fs]
        if args.dry_run:
            download(files, Path(args.weights_dir), dry_run=True)
            return
        download(files, Path(args.weights_dir), progress=not args.no_progress)
        print(f"weights complete in {args.weights_dir}")

    return guarded(go, args.debug)


if __name__ == "__main__":
    sys.exit(main())
