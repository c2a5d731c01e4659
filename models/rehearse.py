"""Real-size rehearsal: every model at its published size, random weights, no download.

    python -m models.rehearse                          # CPU, fp32, all models, then 512 px images end to end
    python -m models.rehearse --device cuda --dtype fp16
    python -m models.rehearse --only vdvae clip --no-pipeline
    make rehearse                                      # the same, under flock /tmp/recon-heavy.lock

Each model is built from the configuration its real checkpoint has (VDVAE ImageNet-64; CLIP
ViT-L/14 text + vision; Versatile Diffusion image UNet, text UNet and AutoencoderKL; the five
evaluation networks; the iCNN's VGG19 and relu7 generator), with seeded random weights, written
to the exact files and folders ``make weights`` produces under a temporary ``weights_dir``, freed,
and loaded back with the pipeline's own loaders (``models.weights --check``). Then two 512 px
synthetic test images (two: the identification metrics need a distractor) go through features →
ridge → vdvae_init → versatile (2 denoising steps) → evaluate with those weights. It catches
configuration and layout mistakes that the tiny test models cannot, before 100+ GB are
downloaded. Models are built, saved and freed one at a time (peak ≈ 11 GB on CPU, while the
Versatile Diffusion UNets load); the temporary folder (~16 GB) is deleted at the end.

Printed per model: parameters next to the published figure, build+save time, load time, peak
memory; then seconds and peak memory per pipeline stage.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pipeline.errors import UserError

GROUPS = ("vdvae", "clip", "versatile", "eval", "icnn")
SEED = 0

#: Published parameter counts (what the real checkpoints hold): (figure, relative tolerance, source).
PUBLISHED = {
    "vdvae": (125_005_860, 0.0, "VDVAE ImageNet-64 (Child 2021)"),
    "clip": (428_000_000, 0.005, "CLIP ViT-L/14, text + vision, ~428M"),
    "versatile": (2_570_000_000, 0.005, "VD UNet pair, image + text flows, ~2.57B"),
    "icnn": (143_667_240, 0.0, "VGG19 (Simonyan & Zisserman 2014)"),
}


# --------------------------------------------------------------------------------------------
# the published configurations (the keys and values of the real config files)
# --------------------------------------------------------------------------------------------


def vd_unet_kwargs() -> dict[str, dict]:
    """Versatile Diffusion's image and text UNets as diffusers builds them (its conversion script:
    model channels 320 × (1, 2, 4, 4), 2 blocks per level, attention on the first three levels,
    8 heads, 768-d context; the text flow works on 768-d vectors as (768, 1, 1) "images")."""
    common = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                  attention_head_dim=8)
    image = dict(in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **common)
    text = dict(in_channels=(768, 1, 1), out_channels=(768, 1, 1),
                down_block_types=("CrossAttnDownBlockFlat",) * 3 + ("DownBlockFlat",),
                up_block_types=("UpBlockFlat",) + ("CrossAttnUpBlockFlat",) * 3, **common)
    return {"image_unet": image, "text_unet": text}


def vd_vae_kwargs() -> dict:
    """The KL-f8 autoencoder (ch 128 × (1, 2, 4, 4), 2 res blocks, 4 latent channels, resolution 256)."""
    from models.versatile import VD_SCALING_FACTOR

    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=4, sample_size=256, scaling_factor=VD_SCALING_FACTOR)


def clip_config():
    """``openai/clip-vit-large-patch14``'s config: text 12×768 (12 heads), vision 24×1024 (16 heads),
    patch 14 at 224 px, projection 768, QuickGELU; the text config keeps the repository's legacy
    bos/eos/pad ids 0/2/1 (transformers then pools at the arg-max token id, i.e. ``<|endoftext|>``)."""
    from transformers import CLIPConfig

    text = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)


# --------------------------------------------------------------------------------------------
# pieces: one file or folder of the weights layout each, built and written one at a time
# --------------------------------------------------------------------------------------------


@dataclass
class Piece:
    group: str
    path: str  # relative to weights_dir (a file, or a folder for save_pretrained)
    build: Callable[[], torch.nn.Module]
    write: Callable[[torch.nn.Module, Path], None]
    state: Callable[[torch.nn.Module], dict] | None = None  # the tensors as written (state-dict files)


def _seeded(fn, seed: int):
    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return fn()
    return build


def _save_state(state_fn):
    def write(module, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state_fn(module), path)
    return write


def _save_pretrained(module, path: Path):
    module.save_pretrained(path)


def _write_clip(model, path: Path):
    from transformers import CLIPImageProcessorPil

    from models.clip_tokenizer import build_clip_tokenizer

    model.save_pretrained(path, safe_serialization=True)
    build_clip_tokenizer().save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(path)


def _swav_state(net) -> dict:
    """As the published SwAV checkpoint: DataParallel prefix, projection head and prototypes, no fc."""
    state = {f"module.{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    g = torch.Generator().manual_seed(SEED)
    extra = {"projection_head.0.weight": (2048, 2048), "projection_head.0.bias": (2048,),
             "projection_head.3.weight": (128, 2048), "projection_head.3.bias": (128,),
             "prototypes.weight": (3000, 128)}
    for k, shape in extra.items():
        state[f"module.{k}"] = torch.randn(shape, generator=g) * 0.01
    return state


def pieces(group: str, models_cfg=None, icnn_cfg=None) -> list[Piece]:
    from pipeline.config import ICNNConfig, ModelsConfig

    m = models_cfg or ModelsConfig()
    ic = icnn_cfg or ICNNConfig()
    plain = lambda net: net.state_dict()  # noqa: E731
    if group == "vdvae":
        from models import vdvae

        build = lambda: vdvae.random_init_(vdvae.VDVAE(vdvae.VDVAEConfig.imagenet64()), seed=SEED)  # noqa: E731
        return [Piece(group, m.vdvae, build, _save_state(plain), plain)]
    if group == "clip":
        from transformers import CLIPModel

        return [Piece(group, m.clip, _seeded(lambda: CLIPModel(clip_config()), SEED), _write_clip)]
    if group == "versatile":
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from models.versatile import UNetFlatConditionModel, vd_scheduler

        kw = vd_unet_kwargs()
        root = m.versatile

        def write_vae(vae, path: Path):
            vae.save_pretrained(path / "vae")
            vd_scheduler().save_pretrained(path / "scheduler")
            (path / "model_index.json").write_text(json.dumps({
                "_class_name": "VersatileDiffusionPipeline",
                "image_unet": ["diffusers", "UNet2DConditionModel"],
                "text_unet": ["versatile_diffusion", "UNetFlatConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
                "image_feature_extractor": ["transformers", "CLIPImageProcessor"]}, indent=2))

        return [
            Piece(group, root, _seeded(lambda: AutoencoderKL(**vd_vae_kwargs()), SEED), write_vae),
            Piece(group, f"{root}/image_unet", _seeded(lambda: UNet2DConditionModel(**kw["image_unet"]), SEED + 1),
                  _save_pretrained),
            Piece(group, f"{root}/text_unet", _seeded(lambda: UNetFlatConditionModel(**kw["text_unet"]), SEED + 2),
                  _save_pretrained),
        ]
    if group == "eval":
        from models import eval_networks as en

        out = []
        for name in ("alexnet", "inception", "effnet", "effnet_v2", "swav"):  # effnet_v2: MindEye's weights
            state = _swav_state if name == "swav" else plain
            arch = name.removesuffix("_v2")
            out.append(Piece(group, en.WEIGHT_FILES[name].filename,
                             _seeded(lambda arch=arch: en._build(arch)[0], SEED), _save_state(state), state))
        out.append(Piece(group, en.WEIGHT_FILES["clip"].filename, _seeded(lambda: en._build_clip(False), SEED),
                         _save_state(plain), plain))
        return out
    if group == "icnn":
        from models.icnn import VGG19, DeepSimGenerator

        def write_generator(gen, path: Path):
            _save_state(plain)(gen, path)
            bound = path.parent / Path(ic.generator_bound).name if ic.generator_bound else None
            if bound:  # 3× the relu7 activation range, one number per unit
                g = torch.Generator().manual_seed(SEED)
                bound.write_text("\n".join(f"{v:.6f}" for v in (torch.rand(4096, generator=g) * 30).tolist()) + "\n")

        return [Piece(group, ic.vgg19, _seeded(VGG19, SEED), _save_state(plain), plain),
                Piece(group, ic.generator, _seeded(DeepSimGenerator, SEED), write_generator, plain)]
    raise UserError(f"unknown model group {group!r}; expected some of {', '.join(GROUPS)}")


def published_count(group: str, params: dict[str, int]) -> int:
    """The parameters the published figure counts (iCNN: the VGG19 only)."""
    if group == "icnn":
        return params[next(p for p in params if "vgg19" in p)]
    if group == "versatile":  # the two UNets (the VAE is not part of the 2.57B)
        return sum(n for p, n in params.items() if p.endswith("_unet"))
    return sum(params.values())


# --------------------------------------------------------------------------------------------
# memory and timing
# --------------------------------------------------------------------------------------------


class Peak:
    """Peak resident memory (VmHWM, reset through /proc/self/clear_refs) and, on CUDA, peak allocated."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> str:
        rss = None
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    rss = int(line.split()[1]) / 2**20
        except OSError:
            pass
        text = f"{rss:.1f} GB RSS" if rss is not None else "RSS n/a"
        if self.cuda:
            text += f", {torch.cuda.max_memory_allocated() / 2**30:.1f} GB GPU"
        return text


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------
# the rehearsal
# --------------------------------------------------------------------------------------------


def write_weights(weights_dir: Path, groups, peak: Peak, log=print) -> dict[str, dict]:
    """Build, write and free every piece of ``groups`` under ``weights_dir``; per-group figures."""
    from pipeline.config import load_config

    cfg = load_config([], [])
    out = {}
    for group in groups:
        t0, peak_text, params, nbytes = time.perf_counter(), "", {}, 0
        peak.reset()
        for piece in pieces(group, cfg.models, cfg.icnn):
            module = piece.build()
            params[piece.path] = sum(p.numel() for p in module.parameters())
            target = weights_dir / piece.path
            piece.write(module, target)
            nbytes += _size(target) if piece.path != cfg.models.versatile else _size(target / "vae")
            del module
            gc.collect()
        peak_text = peak.read()
        out[group] = dict(params=params, build_s=time.perf_counter() - t0, build_peak=peak_text, bytes=nbytes)
        log(f"built   {group:<10} {sum(params.values()):>14,} parameters, {nbytes / 2**30:5.2f} GB written in "
            f"{out[group]['build_s']:6.1f} s (peak {peak_text})")
    return out


def load_back(weights_dir: Path, groups, device: str, peak: Peak, log=print) -> dict[str, dict]:
    """``models.weights.check`` one group at a time: load time, peak memory, its report line."""
    from models.weights import check

    out = {}
    for group in groups:
        peak.reset()
        t0 = time.perf_counter()
        (name, line), = check(weights_dir, [group], device)
        gc.collect()
        out[group] = dict(line=line, load_s=time.perf_counter() - t0, load_peak=peak.read())
        log(f"loaded  {group:<10} in {out[group]['load_s']:6.1f} s (peak {out[group]['load_peak']}): {line}")
    return out


def run_pipeline_once(root: Path, device: str, dtype: str, peak: Peak, log=print) -> list[tuple[str, float, str]]:
    """Two 512 px synthetic test images (8 training images, 64 voxels) through the real-size models
    (two, because the identification metrics need a distractor; Versatile runs them one at a time)."""
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline, select_steps

    overrides = [
        "run.dataset=synthetic", "run.subjects=1", f"run.device={device}", "run.tiny_models=false",
        f"paths.data_dir={root / 'data'}", f"paths.results_dir={root / 'results'}", f"paths.weights_dir={root / 'weights'}",
        "synthetic.n_train=8", "synthetic.n_test=2", "synthetic.n_voxels=64", "synthetic.image_size=512",
        "features.vdvae_batch_size=4", "features.clip_batch_size=4",
        "versatile.num_inference_steps=3",  # strength 0.75 → int(3 · 0.75) = 2 denoising steps
        "versatile.batch_size=1", f"versatile.fp16={'true' if dtype == 'fp16' else 'false'}",
        "evaluate.batch_size=2",
    ]
    cfg = load_config([], overrides)
    steps = select_steps(["prepare", "features", "ridge", "vdvae_init", "versatile", "evaluate"])
    rows, clock = [], [time.perf_counter()]

    def on_step(spec, ctx):
        now = time.perf_counter()
        rows.append((spec.name, now - clock[0], peak.read()))
        log(f"stage   {spec.name:<10} {now - clock[0]:7.1f} s (peak {rows[-1][2]})")
        clock[0] = now
        gc.collect()
        peak.reset()

    peak.reset()
    run_pipeline(cfg, steps, ["1"], device, progress=False, on_step=on_step)
    return rows


def print_table(built: dict, loaded: dict, stages: list, out=print) -> None:
    out("")
    out(f"{'model':<10} {'parameters':>15} {'published':>15} {'diff':>8}  {'build+save':>10} {'load':>7}  peak while loading")
    for group in built:
        params = built[group]["params"]
        n = published_count(group, params)
        fig, tol, what = PUBLISHED.get(group, (None, None, ""))
        if fig:
            rel = (n - fig) / fig
            mark = "ok" if abs(rel) <= tol + 1e-12 else "OFF"
            pub, diff = f"{fig:,}", f"{rel:+.2%} {mark}"
        else:
            pub, diff = "-", ""
        ld = loaded.get(group, {})
        out(f"{group:<10} {n:>15,} {pub:>15} {diff:>8}  {built[group]['build_s']:>9.1f}s "
            f"{ld.get('load_s', float('nan')):>6.1f}s  {ld.get('load_peak', '-')}")
        if fig:
            out(f"{'':<10} ({what}; total in the layout {sum(params.values()):,})")
    out("(load: models.weights --check per model; safetensors files are memory-mapped, so part of the "
        "reading happens on first use, in the stages below; peaks are the process's VmHWM since the "
        "previous line, file-backed pages included)")
    if stages:
        out("")
        out(f"{'stage':<12} {'seconds':>8}  peak")
        for name, secs, pk in stages:
            out(f"{name:<12} {secs:>8.1f}  {pk}")
        out(f"{'total':<12} {sum(s for _, s, _ in stages):>8.1f}")


def rehearse(groups=GROUPS, device: str = "cpu", dtype: str = "fp32", pipeline: bool = True,
             tmp_parent: str | None = None, keep: bool = False, log=print) -> dict:
    from pipeline.runner import resolve_device

    device = resolve_device(device)
    if dtype == "fp16" and not device.startswith("cuda"):
        log("note: fp16 applies to the Versatile Diffusion UNet on CUDA only; running fp32 on the CPU")
    groups = list(groups)
    if pipeline:
        missing = [g for g in ("vdvae", "clip", "versatile", "eval") if g not in groups]
        if missing:
            raise UserError(f"the end-to-end image needs {', '.join(missing)} too (or pass --no-pipeline)")
    if threading.current_thread() is threading.main_thread():  # `timeout`/kill: still delete the ~16 GB
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(tempfile.mkdtemp(prefix="recon-rehearse-", dir=tmp_parent))
    peak = Peak(device)
    log(f"rehearsal in {root} on {device} ({dtype}); weights are random, nothing is downloaded")
    try:
        built = write_weights(root / "weights", groups, peak, log)
        loaded = load_back(root / "weights", groups, device, peak, log)
        stages = run_pipeline_once(root, device, dtype, peak, log) if pipeline else []
        print_table(built, loaded, stages, log)
        bad = [g for g in groups if not loaded[g]["line"].startswith("ok: ")]
        off = [g for g in groups if g in PUBLISHED and abs(published_count(g, built[g]["params"]) - PUBLISHED[g][0])
               > PUBLISHED[g][1] * PUBLISHED[g][0] + 1e-9]
        if bad or off:
            raise UserError(f"rehearsal: {'not loadable: ' + ', '.join(bad) if bad else ''}"
                            f"{'; ' if bad and off else ''}{'parameter count off: ' + ', '.join(off) if off else ''}")
        return dict(built=built, loaded=loaded, stages=stages)
    finally:
        if keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# the layout alone, on the meta device (no tensor memory): what is written vs what loaders expect
# --------------------------------------------------------------------------------------------


def _shapes(state: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _open_clip_meta():
    """``models.eval_networks._build_clip(False)`` on the meta device (open_clip moves to its ``device``)."""
    import open_clip

    return open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True, device="meta")


def meta_layout(root: Path) -> dict[str, tuple[dict, dict, str, int]]:
    """For every state file or folder: (keys → shapes as the builders write them, keys → shapes the
    pipeline's loaders build from the configuration files written under ``root``, its group, its
    parameter count). Built on the meta
    device, so real-size models cost no memory; config files are written as the real savers do."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection

    from models import eval_networks as en
    from models import icnn, vdvae
    from models.versatile import UNetFlatConditionModel
    from pipeline.config import ICNNConfig, ModelsConfig

    m, ic = ModelsConfig(), ICNNConfig()
    out = {}
    with torch.device("meta"):
        for group in GROUPS:
            for piece in pieces(group, m, ic):
                if group == "vdvae":  # random_init_ draws on the CPU; the architecture is what matters
                    module = vdvae.VDVAE(vdvae.VDVAEConfig.imagenet64())
                elif piece.path == en.WEIGHT_FILES["clip"].filename:
                    module = _open_clip_meta()
                else:
                    module = piece.build()
                written = _shapes(piece.state(module) if piece.state else module.state_dict())
                target = root / piece.path
                if group == "clip":
                    module.config.save_pretrained(target)
                    text = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(target))
                    vision = CLIPVisionModelWithProjection(CLIPVisionConfig.from_pretrained(target))
                    expected = {**_shapes(text.state_dict()), **_shapes(vision.state_dict())}
                    # the towers read their part of the CLIPModel file; the rest (logit_scale) is unused
                    written = {k: v for k, v in written.items() if k in expected}
                elif group == "versatile":
                    sub = {m.versatile: "vae"}.get(piece.path, "")
                    folder = target / sub if sub else target
                    module.save_config(folder)
                    cls = {"vae": AutoencoderKL, "image_unet": UNet2DConditionModel,
                           "text_unet": UNetFlatConditionModel}[folder.name]
                    expected = _shapes(cls.from_config(cls.load_config(folder)).state_dict())
                elif group == "vdvae":
                    expected = _shapes(vdvae.VDVAE(vdvae.VDVAEConfig.imagenet64()).state_dict())
                elif group == "eval":
                    name = next(n for n, w in en.WEIGHT_FILES.items() if w.filename == piece.path)
                    net = _open_clip_meta() if name == "clip" else en._build(name.removesuffix("_v2"))[0]
                    expected = _shapes(net.state_dict())
                    if name == "swav":  # the loader drops the prefix and the SwAV head; fc stays random
                        written = {k.removeprefix("module."): v for k, v in written.items()
                                   if not k.startswith(("module.projection_head.", "module.prototypes."))}
                        expected = {k: v for k, v in expected.items() if not k.startswith("fc.")}
                else:
                    expected = _shapes((icnn.VGG19() if piece.path == ic.vgg19 else icnn.DeepSimGenerator()).state_dict())
                out[piece.path] = (written, expected, group, sum(p.numel() for p in module.parameters()))
    return out


def main(argv=None) -> int:
    from pipeline.cli import guarded, setup_logging

    p = argparse.ArgumentParser(prog="python -m models.rehearse", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                   help="fp16: the Versatile Diffusion UNet in half precision (CUDA), as the pipeline runs it")
    p.add_argument("--only", nargs="+", choices=GROUPS, default=None, metavar="MODEL",
                   help=f"model groups ({', '.join(GROUPS)}); implies --no-pipeline unless all four it needs are named")
    p.add_argument("--no-pipeline", action="store_true", help="build, write and load only; no end-to-end image")
    p.add_argument("--tmp-dir", default=None, help="parent of the temporary weights folder (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (it holds ~16 GB)")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup_logging(args.debug)
    groups = args.only or list(GROUPS)
    pipeline = not args.no_pipeline and all(g in groups for g in ("vdvae", "clip", "versatile", "eval"))
    return guarded(lambda: rehearse(groups, args.device, args.dtype, pipeline, args.tmp_dir, args.keep) and None,
                   args.debug)


if __name__ == "__main__":
    sys.exit(main())
