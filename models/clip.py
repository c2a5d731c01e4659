"""CLIP ViT-L/14 text (77 x D) and vision (257 x D) token embeddings, as Brain-Diffuser / Versatile Diffusion use them.

Both encoders return *every* token, projected into the joint space and divided by one scalar per
input: the norm of the projected pooled token (text: EOS state; vision: post-LayerNorm CLS state).
So the EOS / CLS row is unit-norm and the other rows keep their relative scale (method.md §3; same
formula as diffusers' VersatileDiffusionDualGuidedPipeline ``normalize_embeddings``).

Vision preprocessing reproduces the reference pixel path exactly (method.md §3.3): uint8 image ->
PIL bilinear resize to 512x512 -> ``to_tensor`` -> ``*2-1`` -> ``(x+1)/2`` -> ``x*255`` cast to uint8
(truncation: the float32 round trip lowers the values 1..63 by one) -> CLIP processor (shortest side
bicubic to 224, centre crop 224, /255, CLIP mean/std). The processor is the PIL backend
(``CLIPImageProcessorPil``), fed uint8 PIL images, so nothing is rescaled twice and the resize is
PIL's bicubic as in transformers 4.19 (the default torchvision backend resizes differently).

Weights are only read from a local directory (``local_files_only=True``, safetensors only, no pickle).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from tqdm.auto import tqdm
from transformers import (
    CLIPImageProcessorPil,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)
from transformers.utils import logging as hf_logging

from models.clip_tokenizer import BOS_ID, EOS_ID, MAX_LENGTH, VOCAB_SIZE, build_clip_tokenizer, clean_caption
from pipeline.errors import UserError

HF_REPO = "openai/clip-vit-large-patch14"
REFERENCE_SIZE = 512  # the reference resizes every stimulus to 512x512 (PIL bilinear) before CLIP
UNCOND_GRAY_VALUE = 127  # zeros in [-1,1] -> 0.5 -> 0.5*255 = 127.5 -> uint8 truncation -> 127
UNCOND_GRAY_SIZE = 224  # the reference encodes a zeros(1,3,224,224) tensor
PROGRESS_MIN_ITEMS = 256
SUBFOLDERS = {
    "tokenizer": ("tokenizer",),
    "text": ("text_encoder",),
    "vision": ("image_encoder",),
    "processor": ("image_processor", "image_feature_extractor", "feature_extractor"),
}
_GET_WEIGHTS = (
    f"download the HF-format weights of {HF_REPO} there: `make weights` (python -m models.weights "
    f"--only clip) or `hf download {HF_REPO} --local-dir <dir>`; a folder with tokenizer/ text_encoder/ "
    "image_encoder/ image_processor/ works too when the encoders hold model.safetensors (Versatile "
    "Diffusion's own text_encoder/ and image_encoder/ hold only pickled .bin files, which are never loaded)"
)


def _float_round_trip_lut() -> np.ndarray:
    """uint8 -> uint8 table of the reference's to_tensor -> *2-1 -> (x+1)/2 -> *255 -> astype(uint8) round trip.

    Every step is an element-wise float32 operation, so a 256-entry table reproduces it exactly.
    ``to_tensor`` divides by 255 with correct rounding (CPU ``div``), hence the float64 division.
    """
    x = (np.arange(256, dtype=np.float64) / 255).astype(np.float32)
    x = x * np.float32(2) - np.float32(1)
    x = (x + np.float32(1)) / np.float32(2)
    return (x * np.float32(255)).astype(np.uint8)


ROUND_TRIP_LUT = _float_round_trip_lut()


def reference_image(image: np.ndarray, reference_resize: bool = True) -> Image.Image:
    """One stimulus (H, W, 3) uint8 -> the uint8 PIL image the reference hands to the CLIP processor.

    With ``reference_resize`` the image is squashed to 512x512 (PIL bilinear, as torchvision's
    ``resize`` on a PIL image) and passed through the [-1,1] float round trip; without it the uint8
    image goes to the processor unchanged.
    """
    pil = Image.fromarray(image)
    if not reference_resize:
        return pil
    pil = TF.resize(pil, [REFERENCE_SIZE, REFERENCE_SIZE], interpolation=TF.InterpolationMode.BILINEAR)
    return Image.fromarray(ROUND_TRIP_LUT[np.asarray(pil)])


def caption_mask(captions: np.ndarray) -> np.ndarray:
    """(N, n_cap) captions -> bool (N, n_cap), True where the caption is present (not empty or blank)."""
    captions = _check_captions(captions)
    return np.char.str_len(np.char.strip(captions)) > 0


def images_without_captions(captions: np.ndarray) -> np.ndarray:
    """(N, n_cap) captions -> bool (N,), True for images with no caption at all (callers log a warning)."""
    return ~caption_mask(captions).any(axis=1)


def _check_captions(captions) -> np.ndarray:
    arr = np.asarray(captions)
    if arr.dtype.kind == "S":
        arr = np.char.decode(arr, "utf-8")
    elif arr.dtype.kind == "O":
        if not all(isinstance(c, str) for c in arr.ravel()):
            raise UserError(f"captions: expected strings, got an object array holding {type(arr.ravel()[0]).__name__}")
        arr = arr.astype(str)
    if arr.dtype.kind != "U" or arr.ndim != 2:
        raise UserError(f"captions: expected a 2-D string array (n_images, n_captions), got dtype {arr.dtype} "
                        f"shape {arr.shape}; use '' for a missing caption")
    return arr


def _check_images(images) -> Sequence[np.ndarray]:
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise UserError(f"images: expected uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        return images
    images = list(images)
    for i, im in enumerate(images):
        im = np.asarray(im)
        if im.ndim != 3 or im.shape[-1] != 3 or im.dtype != np.uint8:
            raise UserError(f"images[{i}]: expected uint8 (H, W, 3), got {im.dtype} {im.shape}")
    return images


def _show_progress(progress: bool | None, n: int) -> bool:
    """``None`` = automatic: a bar only for large inputs (callers encoding small chunks stay quiet)."""
    return n > PROGRESS_MIN_ITEMS if progress is None else progress


def _resolve_dirs(path: Path) -> dict[str, Path]:
    """Map tokenizer/text/vision/processor to folders, for the CLIPModel layout or the diffusers-VD layout."""
    if not path.is_dir():
        raise UserError(f"{path}: CLIP directory not found; {_GET_WEIGHTS}")
    if (path / "text_encoder").is_dir() or (path / "image_encoder").is_dir():
        dirs = {}
        for part, names in SUBFOLDERS.items():
            found = [path / n for n in names if (path / n).is_dir()]
            if not found:
                raise UserError(f"{path}: no {' or '.join(n + '/' for n in names)} subfolder; {_GET_WEIGHTS}")
            dirs[part] = found[0]
    elif (path / "config.json").is_file():
        dirs = dict.fromkeys(SUBFOLDERS, path)
    else:
        raise UserError(f"{path}: neither a CLIPModel folder (config.json) nor a folder with text_encoder/ and "
                        f"image_encoder/; {_GET_WEIGHTS}")
    for part in ("text", "vision"):
        d = dirs[part]
        if not (d / "config.json").is_file():
            raise UserError(f"{d / 'config.json'}: file not found; {_GET_WEIGHTS}")
        if not ((d / "model.safetensors").is_file() or (d / "model.safetensors.index.json").is_file()):
            pickled = [p.name for p in d.glob("*.bin")]
            hint = f" (found only pickle files {pickled}; they are never loaded)" if pickled else ""
            raise UserError(f"{d / 'model.safetensors'}: file not found{hint}; {_GET_WEIGHTS}")
    if not (dirs["processor"] / "preprocessor_config.json").is_file():
        raise UserError(f"{dirs['processor'] / 'preprocessor_config.json'}: file not found; {_GET_WEIGHTS}")
    tok = dirs["tokenizer"]
    if not ((tok / "tokenizer.json").is_file() or ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file())):
        raise UserError(f"{tok}: no tokenizer.json or vocab.json + merges.txt; {_GET_WEIGHTS}")
    return dirs


def _load_tower(model_cls, folder: Path, dtype: torch.dtype):
    """Load one tower strictly: a missing weight would silently stay random, so it is an error.

    Unexpected keys are normal (a CLIPModel folder also holds the other tower) and are not reported.
    """
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = model_cls.from_pretrained(folder, use_safetensors=True, dtype=dtype, local_files_only=True,
                                                output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - a truncated/corrupt weight or config file
        from models.checkpoint import first_line

        raise UserError(f"{folder}: cannot load the {model_cls.__name__} weights ({first_line(exc)}); the "
                        f"file is truncated or corrupt: download it again; {_GET_WEIGHTS}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    bad = list(info.get("missing_keys", [])) + list(info.get("mismatched_keys", []))
    if bad:
        raise UserError(f"{folder}: {model_cls.__name__} weights missing or of the wrong shape: "
                        f"{', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''}; {_GET_WEIGHTS}")
    return model


class CLIPEmbedder:
    """CLIP tokenizer + text and vision towers with projections, producing normalised token embeddings.

    ``D`` below is the projection width (768 for ViT-L/14, 32 for ``tiny``); ``T`` the number of
    vision tokens (257 = 16*16 patches + CLS for ViT-L/14 at 224 px, and for ``tiny``).
    """

    def __init__(self, tokenizer: CLIPTokenizer, text_model: CLIPTextModelWithProjection,
                 vision_model: CLIPVisionModelWithProjection, image_processor: CLIPImageProcessorPil,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if text_model.config.projection_dim != vision_model.config.projection_dim:
            raise UserError(f"CLIP text projection {text_model.config.projection_dim} != vision projection "
                            f"{vision_model.config.projection_dim}: text and image encoders do not belong together")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = torch.device(device)
        self.dtype = dtype
        self.text_model = text_model.to(self.device, dtype).eval().requires_grad_(False)
        self.vision_model = vision_model.to(self.device, dtype).eval().requires_grad_(False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "CLIPEmbedder":
        """Load from a local folder: either a ``CLIPModel`` folder (``openai/clip-vit-large-patch14``)
        or one with ``tokenizer/ text_encoder/ image_encoder/ image_processor|image_feature_extractor/``
        (diffusers Versatile Diffusion layout, also what ``save_pretrained`` writes)."""
        dirs = _resolve_dirs(Path(path))
        kw = dict(local_files_only=True)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(dirs["tokenizer"], **kw)
            text = _load_tower(CLIPTextModelWithProjection, dirs["text"], dtype)
            vision = _load_tower(CLIPVisionModelWithProjection, dirs["vision"], dtype)
            processor = CLIPImageProcessorPil.from_pretrained(dirs["processor"], **kw)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{path}: cannot load CLIP ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                            f"{_GET_WEIGHTS}") from None
        return cls(tokenizer, text, vision, processor, device=device, dtype=dtype)

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "CLIPEmbedder":
        """Randomly initialised tiny CLIP (width 32, 2 layers, D=32) with the real tokenizer and 257 vision tokens
        (32 px images, patch 2), for tests and the demo. Same seed -> same weights; global RNG untouched."""
        text_cfg = CLIPTextConfig(
            vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH, projection_dim=32, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
            pad_token_id=EOS_ID,
        )
        vision_cfg = CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=2, projection_dim=32,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text = CLIPTextModelWithProjection(text_cfg)
            vision = CLIPVisionModelWithProjection(vision_cfg)
        processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        return cls(build_clip_tokenizer(), text, vision, processor, device=device, dtype=dtype)

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write ``tokenizer/ text_encoder/ image_encoder/ image_processor/`` (safetensors) under ``out_dir``."""
        out_dir = Path(out_dir)
        self.tokenizer.save_pretrained(out_dir / "tokenizer")
        self.text_model.save_pretrained(out_dir / "text_encoder", safe_serialization=True)
        self.vision_model.save_pretrained(out_dir / "image_encoder", safe_serialization=True)
        self.image_processor.save_pretrained(out_dir / "image_processor")
        return out_dir

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "CLIPEmbedder":
        """Move both towers (in place) and return self."""
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        self.text_model.to(self.device, self.dtype)
        self.vision_model.to(self.device, self.dtype)
        return self

    # ------------------------------------------------------------------ sizes
    @property
    def dim(self) -> int:
        """Projection width D."""
        return int(self.text_model.config.projection_dim)

    @property
    def n_text_tokens(self) -> int:
        return MAX_LENGTH

    @property
    def n_image_tokens(self) -> int:
        cfg = self.vision_model.config
        return (cfg.image_size // cfg.patch_size) ** 2 + 1

    # ------------------------------------------------------------------ text
    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """captions -> int64 (n, 77) ids: BOS, BPE tokens (truncated to 75), EOS, EOS padding."""
        captions = [clean_caption(c) for c in captions]
        return self.tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                              return_tensors="pt").input_ids

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """captions -> float32 (n, 77, D) on ``device``: all 77 final-LN states projected, divided by the
        norm of the projected EOS state (one scalar per caption)."""
        captions = list(captions)
        if not captions:
            return torch.zeros(0, MAX_LENGTH, self.dim, device=self.device)
        ids = self.tokenize(captions).to(self.device)
        out = self.text_model.text_model(input_ids=ids)
        proj = self.text_model.text_projection
        tokens = proj(out.last_hidden_state).float()
        pooled = proj(out.pooler_output).float()
        return tokens / pooled.norm(dim=-1)[:, None, None]

    def encode_captions_per_image(self, captions: np.ndarray, batch_size: int = 64, out: np.ndarray | None = None,
                                  return_missing: bool = False, progress: bool | None = None):
        """(N, n_cap) captions ('' = missing) -> float32 (N, 77, D): mean of the normalised embeddings of each
        image's present captions (the reference's per-image average).

        An image without any caption gets the embedding of the empty string '' (the same as the
        unconditional text context). The reference never meets this (NSD always has captions; it would
        crash on an empty batch); Deeprecon/THINGS may. With ``return_missing`` a bool (N,) mask of those
        images is returned as well, so the caller can log a warning. Captions of several images are
        encoded together, up to ``batch_size`` per forward pass (an image is never split). ``out`` may
        be a preallocated (e.g. memory-mapped) (N, 77, D) array to fill.
        """
        captions = _check_captions(captions)
        present = caption_mask(captions)
        n = len(captions)
        if out is None:
            out = np.empty((n, MAX_LENGTH, self.dim), dtype=np.float32)
        elif out.shape != (n, MAX_LENGTH, self.dim):
            raise UserError(f"out: expected shape {(n, MAX_LENGTH, self.dim)}, got {out.shape}")
        missing = ~present.any(axis=1)
        if missing.any():
            out[missing] = self.unconditional_text().cpu().numpy()
        todo = np.flatnonzero(~missing)
        bar = tqdm(total=n, desc="CLIP text", unit="img", disable=not _show_progress(progress, n))
        bar.update(int(missing.sum()))
        start = 0
        while start < len(todo):
            group, n_caps = [], 0  # consecutive images whose captions fit in one batch
            while start < len(todo) and (not group or n_caps + present[todo[start]].sum() <= batch_size):
                group.append(todo[start])
                n_caps += int(present[todo[start]].sum())
                start += 1
            texts = [str(c) for i in group for c in captions[i][present[i]]]
            emb = self.encode_text(texts).cpu()
            offset = 0
            for i in group:
                k = int(present[i].sum())
                out[i] = emb[offset:offset + k].mean(dim=0).numpy()
                offset += k
            bar.update(len(group))
        bar.close()
        return (out, missing) if return_missing else out

    # ------------------------------------------------------------------ vision
    def pixel_values(self, images, reference_resize: bool = True) -> torch.Tensor:
        """uint8 (N, H, W, 3) (or a list of (H, W, 3)) -> float32 (N, 3, S, S) CLIP input (S = 224 for ViT-L/14)."""
        images = _check_images(images)
        pils = [reference_image(np.asarray(im), reference_resize) for im in images]
        return self.image_processor(images=pils, return_tensors="pt").pixel_values

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) CLIP input -> float32 (n, T, D): encoder output (before post-LN) -> post-LN on every
        token -> visual projection -> divided by the norm of the projected CLS token."""
        px = pixel_values.to(self.device, self.dtype)
        vm = self.vision_model
        hidden = vm.vision_model(pixel_values=px).last_hidden_state
        tokens = vm.visual_projection(vm.vision_model.post_layernorm(hidden)).float()
        return tokens / tokens[:, :1].norm(dim=-1, keepdim=True)

    def encode_images(self, images, batch_size: int = 16, reference_resize: bool = True,
                      out: np.ndarray | None = None, progress: bool | None = None) -> np.ndarray:
        """uint8 (N, H, W, 3) stimuli -> float32 (N, T, D) normalised vision tokens (reference pixel path).

        ``reference_resize=False`` skips the 512x512 detour and its uint8 round trip (the processor then
        resizes the shortest side and centre-crops, keeping the aspect ratio). ``out`` may be a
        preallocated (e.g. memory-mapped) (N, T, D) array to fill.
        """
        images = _check_images(images)
        n = len(images)
        shape = (n, self.n_image_tokens, self.dim)
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape:
            raise UserError(f"out: expected shape {shape}, got {out.shape}")
        for start in tqdm(range(0, n, batch_size), desc="CLIP vision", unit="batch",
                          disable=not _show_progress(progress, n)):
            batch = images[start:start + batch_size]
            out[start:start + len(batch)] = self.encode_pixels(self.pixel_values(batch, reference_resize)).cpu().numpy()
        return out

    # ------------------------------------------------------------------ unconditional contexts
    def unconditional_text(self) -> torch.Tensor:
        """float32 (77, D): the embedding of the empty prompt ''."""
        return self.encode_text([""])[0]

    def unconditional_image(self) -> torch.Tensor:
        """float32 (T, D): the embedding of a uniform gray 224x224 image of value 127, which is what the
        reference's ``clip_encode_vision(zeros(1,3,224,224))`` feeds CLIP (0.5*255 truncated)."""
        gray = np.full((1, UNCOND_GRAY_SIZE, UNCOND_GRAY_SIZE, 3), UNCOND_GRAY_VALUE, dtype=np.uint8)
        return self.encode_pixels(self.pixel_values(gray, reference_resize=False))[0]
