"""The frozen networks behind the image-reconstruction metrics, with hooks on the scored layers.

Which network and which layer each metric reads (Brain-Diffuser ``scripts/eval_extract_features.py``,
MindEye ``src/Reconstruction_Metrics.py``; see ``method.md`` §6.2 and ``prior-art.md`` §2):

=========  ==========================================  =======================  ==================
network    architecture (weights)                      layer key                features per image
=========  ==========================================  =======================  ==================
alexnet    torchvision AlexNet (IMAGENET1K_V1)          ``features.4``           192x27x27 at 224 px
                                                        ``features.11``          256x13x13 at 224 px
inception  torchvision Inception-v3 (IMAGENET1K_V1),    ``avgpool``              2048
           ``transform_input=True`` as the pretrained
           constructor sets it
clip       open_clip ViT-L/14 with QuickGELU (OpenAI)   ``embedding``            768 (projected, not
                                                                                 L2-normalised)
effnet     torchvision EfficientNet-B1: IMAGENET1K_V1   ``avgpool``              1280
           for Brain-Diffuser, IMAGENET1K_V2 (the
           ``DEFAULT``) for MindEye
swav       torchvision ResNet-50 with SwAV weights      ``avgpool``              2048
           (``fc`` stays random, as in torch.hub)
=========  ==========================================  =======================  ==================

Real weights are plain files in one folder (``weights_dir``), named as in :data:`WEIGHT_FILES`;
``make weights`` downloads them from the URLs listed there. Nothing is downloaded here.
``tiny=True`` builds the same torchvision architectures randomly initialised from a fixed seed,
and a small open_clip CLIP (same classes, same forward) instead of ViT-L/14, for tests and demos.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Iterable, NamedTuple

import torch
from torch import nn

from pipeline.errors import UserError

# --------------------------------------------------------------------------------------------
# Weight files
# --------------------------------------------------------------------------------------------


class WeightFile(NamedTuple):
    """One downloadable weight file: its name inside ``weights_dir``, its URL, its SHA-256 if known."""

    filename: str
    url: str
    sha256: str | None

    @property
    def sha256_prefix(self) -> str | None:
        """torchvision file names end in the first hex digits of the file's SHA-256 (``-7be5be79.pth``)."""
        match = re.search(r"-([0-9a-f]{8,})\.pth$", self.filename)
        return match.group(1) if match else None


#: NAME -> (filename, url, sha256 or None). Names are the keys ``load_eval_networks`` accepts,
#: except ``effnet_v2`` (the MindEye-profile EfficientNet weights, chosen through ``profile``).
WEIGHT_FILES: dict[str, WeightFile] = {
    "alexnet": WeightFile(
        "alexnet-owt-7be5be79.pth",
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        None,
    ),
    "inception": WeightFile(
        "inception_v3_google-0cc3c7bd.pth",
        "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
        None,
    ),
    # Brain-Diffuser calls efficientnet_b1(weights=True): torchvision's legacy flag -> IMAGENET1K_V1.
    "effnet": WeightFile(
        "efficientnet_b1_rwightman-bac287d4.pth",
        "https://download.pytorch.org/models/efficientnet_b1_rwightman-bac287d4.pth",
        None,
    ),
    # MindEye uses EfficientNet_B1_Weights.DEFAULT = IMAGENET1K_V2.
    "effnet_v2": WeightFile(
        "efficientnet_b1-c27df63c.pth",
        "https://download.pytorch.org/models/efficientnet_b1-c27df63c.pth",
        None,
    ),
    # torch.hub 'facebookresearch/swav:main' 'resnet50' loads exactly this file (keys prefixed 'module.').
    "swav": WeightFile(
        "swav_800ep_pretrain.pth.tar",
        "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar",
        None,
    ),
    # OpenAI CLIP ViT-L/14 as an open_clip state dict (what open_clip's pretrained='openai' fetches).
    "clip": WeightFile(
        "ViT-L-14_openai_open_clip_pytorch_model.bin",
        "https://huggingface.co/timm/vit_large_patch14_clip_224.openai/resolve/main/open_clip_pytorch_model.bin",
        None,
    ),
}

#: Also accepted for CLIP when present (the same weights in safetensors form, preferred if both exist;
#: HF timm/vit_large_patch14_clip_224.openai, file open_clip_model.safetensors — not fetched by make weights).
CLIP_SAFETENSORS_FILENAME = "ViT-L-14_openai_open_clip_model.safetensors"

#: DreamSim (optional extra metric) keeps its own checkpoints in this sub-folder of ``weights_dir``.
DREAMSIM_SUBDIR = "dreamsim"

NETWORK_NAMES = ("alexnet", "inception", "clip", "effnet", "swav")
OPTIONAL_NETWORK_NAMES = ("dreamsim",)
PROFILES = ("braindiffuser", "mindeye")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: The tiny CLIP: open_clip's CLIP class at toy width; 224 px input and 14 px patches as ViT-L/14.
TINY_CLIP_CFG = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=224, patch_size=14, width=64, layers=2, head_width=32),
    text_cfg=dict(context_length=77, vocab_size=1000, width=32, heads=2, layers=1),
)


def weight_entry(name: str, profile: str = "braindiffuser") -> WeightFile:
    """The weight file that network ``name`` loads under ``profile`` (EfficientNet differs by profile)."""
    _check_profile(profile)
    if name == "effnet" and profile == "mindeye":
        return WEIGHT_FILES["effnet_v2"]
    if name not in WEIGHT_FILES:
        raise UserError(f"unknown evaluation network {name!r}; expected one of {NETWORK_NAMES}")
    return WEIGHT_FILES[name]


def missing_weight_files(
    weights_dir: str | os.PathLike, names: Iterable[str] | None = None, profile: str = "braindiffuser"
) -> list[str]:
    """Filenames that ``load_eval_networks(weights_dir, names=names, profile=profile)`` needs and lacks.

    Call it before an expensive step so that a missing file fails the run at once.
    """
    weights_dir = Path(weights_dir)
    missing = []
    for name in names or NETWORK_NAMES:
        if name in OPTIONAL_NETWORK_NAMES:
            continue
        entry = weight_entry(name, profile)
        if name == "clip" and (weights_dir / CLIP_SAFETENSORS_FILENAME).is_file():
            continue
        if not (weights_dir / entry.filename).is_file():
            missing.append(entry.filename)
    return missing


# --------------------------------------------------------------------------------------------
# The hooked network
# --------------------------------------------------------------------------------------------


class EvalNetwork(nn.Module):
    """A frozen backbone whose forward returns the scored layers, flattened per image.

    ``layers`` maps an output key to a sub-module path (``"features.4"``); the path ``""`` means the
    backbone's own output. Forward hooks read the activations, as Brain-Diffuser does, so the
    backbone runs unchanged.

    Attributes: ``name``, ``normalisation`` (``"imagenet"`` or ``"clip"``: which mean/std its input
    needs), ``weights`` (the file loaded, or ``"random(seed=S)"``), ``tiny``, ``dtype``.
    """

    def __init__(
        self,
        name: str,
        backbone: nn.Module,
        layers: dict[str, str],
        normalisation: str,
        weights: str,
        tiny: bool,
    ):
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.layers = dict(layers)
        self.normalisation = normalisation
        self.weights = weights
        self.tiny = tiny
        self._captured: dict[str, torch.Tensor] = {}
        for key, path in self.layers.items():
            if path:
                backbone.get_submodule(path).register_forward_hook(self._make_hook(key))
        self.eval().requires_grad_(False)

    def _make_hook(self, key: str):
        def hook(module, inputs, output):
            self._captured[key] = output

        return hook

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (N, 3, H, W) normalised images -> {layer key: (N, D) float32 features}."""
        self._captured = {}
        out = self.backbone(x.to(device=self.device, dtype=self.dtype))
        feats = {}
        for key, path in self.layers.items():
            value = self._captured[key] if path else out
            feats[key] = value.float().flatten(1)
        self._captured = {}
        return feats


# --------------------------------------------------------------------------------------------
# Builders (architecture only) and loaders
# --------------------------------------------------------------------------------------------


def _build(name: str) -> tuple[nn.Module, dict[str, str], str]:
    """Architecture of network ``name`` (random init), its scored layers and its normalisation."""
    import torchvision.models as tvm

    if name == "alexnet":
        return tvm.alexnet(weights=None), {"features.4": "features.4", "features.11": "features.11"}, "imagenet"
    if name == "inception":
        # As inception_v3(weights=IMAGENET1K_V1) builds it: the input transform is part of the network.
        net = tvm.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=True)
        return net, {"avgpool": "avgpool"}, "imagenet"
    if name == "effnet":
        return tvm.efficientnet_b1(weights=None), {"avgpool": "avgpool"}, "imagenet"
    if name == "swav":
        return tvm.resnet50(weights=None), {"avgpool": "avgpool"}, "imagenet"
    raise UserError(f"unknown evaluation network {name!r}; expected one of {NETWORK_NAMES}")


def _build_clip(tiny: bool) -> nn.Module:
    """The CLIP image tower: ``model.visual`` of an open_clip CLIP with QuickGELU (as OpenAI's)."""
    import open_clip

    if tiny:
        model = open_clip.CLIP(**TINY_CLIP_CFG, quick_gelu=True)
    else:
        # OpenAI's weights need QuickGELU; the plain 'ViT-L-14' config uses nn.GELU.
        model = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True)
    return model


def _missing_file_error(path: Path, entry: WeightFile) -> UserError:
    return UserError(
        f"{path}: evaluation weight file not found; run `make weights` "
        f"(or download {entry.url} to that path)"
    )


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or a file that would need unpickling of code
        from models.checkpoint import first_line

        raise UserError(f"{path}: cannot read as a tensor-only checkpoint ({first_line(exc)}); the file is "
                        "truncated or corrupt (download it again), or holds more than tensors") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def _load_state(name: str, net: nn.Module, path: Path) -> None:
    state = _torch_load(path)
    if name == "swav":
        # The SwAV checkpoint is a DataParallel resnet50 plus projection head and prototypes; fc is
        # absent (torch.hub leaves it random; it is after avgpool, so the metric never sees it).
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith(("projection_head.", "prototypes."))}
        result = net.load_state_dict(state, strict=False)
        bad_missing = [k for k in result.missing_keys if not k.startswith("fc.")]
        if bad_missing or result.unexpected_keys:
            raise UserError(
                f"{path}: not a SwAV ResNet-50 checkpoint (missing {bad_missing[:3]}, "
                f"unexpected {result.unexpected_keys[:3]})"
            )
        return
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"{path}: does not match the {name} architecture ({first})") from None


def _load_clip_weights(model: nn.Module, weights_dir: Path) -> Path:
    import open_clip

    path = weights_dir / CLIP_SAFETENSORS_FILENAME
    if not path.is_file():
        path = weights_dir / WEIGHT_FILES["clip"].filename
    if not path.is_file():
        raise _missing_file_error(path, WEIGHT_FILES["clip"])
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"{path}: cannot load as open_clip ViT-L-14 weights ({first})") from None
    return path


def load_eval_network(
    name: str,
    weights_dir: str | os.PathLike | None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    tiny: bool = False,
    profile: str = "braindiffuser",
    seed: int = 0,
) -> EvalNetwork:
    """One evaluation network, frozen, in eval mode, on ``device``.

    ``profile`` picks the EfficientNet weights (V1 for Brain-Diffuser, V2 for MindEye) and, for
    MindEye on CUDA, runs CLIP in float16 as the ``clip`` package does there. ``tiny=True`` ignores
    ``weights_dir`` and initialises randomly from ``seed`` (the global RNG is left untouched).
    """
    _check_profile(profile)
    device = torch.device(device)
    if name not in NETWORK_NAMES:
        raise UserError(f"unknown evaluation network {name!r}; expected one of {NETWORK_NAMES}")
    entry = weight_entry(name, profile)
    if not tiny:
        if weights_dir is None:
            raise UserError("weights_dir is required for the real evaluation networks (or pass tiny=True)")
        weights_dir = Path(weights_dir)
        if missing_weight_files(weights_dir, [name], profile):
            raise _missing_file_error(weights_dir / entry.filename, entry)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "clip":
            model = _build_clip(tiny)
        else:
            net, layers, normalisation = _build(name)

    if name == "clip":
        weights = f"random(seed={seed})" if tiny else str(_load_clip_weights(model, weights_dir).name)
        net, layers, normalisation = model.visual, {"embedding": ""}, "clip"
        del model  # keep the image tower only
        if profile == "mindeye" and device.type == "cuda":
            dtype = torch.float16
    else:
        if tiny:
            weights = f"random(seed={seed})"
        else:
            _load_state(name, net, weights_dir / entry.filename)
            weights = entry.filename
    net = net.to(device=device, dtype=dtype)
    return EvalNetwork(name, net, layers, normalisation, weights=weights, tiny=tiny)


def load_eval_networks(
    weights_dir: str | os.PathLike | None,
    device: str | torch.device = "cpu",
    names: Iterable[str] | None = None,
    tiny: bool = False,
    profile: str = "braindiffuser",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, EvalNetwork]:
    """The evaluation networks by name (default: all five; ``"dreamsim"`` only when named or present).

    ``weights_dir`` holds the files of :data:`WEIGHT_FILES` side by side. Every missing file is
    reported in one :class:`UserError` before anything is built. With ``names=None`` DreamSim is added
    when its package and its checkpoint folder (``weights_dir/dreamsim``) are present; naming it
    explicitly makes a missing DreamSim an error.
    """
    _check_profile(profile)
    explicit = names is not None
    names = list(names) if explicit else list(NETWORK_NAMES)
    unknown = [n for n in names if n not in NETWORK_NAMES + OPTIONAL_NETWORK_NAMES]
    if unknown:
        raise UserError(f"unknown evaluation network(s) {unknown}; expected some of {NETWORK_NAMES + OPTIONAL_NETWORK_NAMES}")
    if not tiny:
        if weights_dir is None:
            raise UserError("weights_dir is required for the real evaluation networks (or pass tiny=True)")
        missing = missing_weight_files(weights_dir, names, profile)
        if missing:
            raise UserError(
                f"{weights_dir}: evaluation weight file(s) not found: {', '.join(missing)}; run `make weights`"
            )
    nets: dict[str, EvalNetwork | DreamSimNetwork] = {}
    for name in names:
        if name == "dreamsim":
            continue
        nets[name] = load_eval_network(name, weights_dir, device, dtype=dtype, tiny=tiny, profile=profile, seed=seed)
    want_dreamsim = "dreamsim" in names if explicit else (not tiny and dreamsim_available(weights_dir)[0])
    if want_dreamsim:
        nets["dreamsim"] = load_dreamsim(weights_dir, device)
    return nets


# --------------------------------------------------------------------------------------------
# DreamSim (optional)
# --------------------------------------------------------------------------------------------


class DreamSimNetwork:
    """DreamSim distance between image pairs (lower = more similar); needs the ``dreamsim`` package.

    Its own preprocessing (224 px) is used; ``distance(recons, gts)`` takes two lists of PIL images.
    """

    name = "dreamsim"
    tiny = False

    def __init__(self, model, preprocess, device: torch.device, weights: str):
        self.model = model
        self.preprocess = preprocess
        self.device = device
        self.weights = weights

    @torch.no_grad()
    def distance(self, recons: list, gts: list) -> torch.Tensor:
        """recons, gts: equal-length lists of PIL RGB images -> (N,) distances."""
        a = torch.cat([self.preprocess(im) for im in recons]).to(self.device)
        b = torch.cat([self.preprocess(im) for im in gts]).to(self.device)
        return self.model(a, b).float().reshape(-1).cpu()


def dreamsim_available(weights_dir: str | os.PathLike | None) -> tuple[bool, str]:
    """(True, "") if DreamSim can be loaded offline; else (False, why)."""
    if importlib.util.find_spec("dreamsim") is None:
        return False, "the `dreamsim` package is not installed (pip install dreamsim)"
    if weights_dir is None:
        return False, "no weights_dir given for the DreamSim checkpoints"
    cache = Path(weights_dir) / DREAMSIM_SUBDIR
    if not cache.is_dir() or not any(cache.iterdir()):
        return False, (
            f"{cache}: DreamSim checkpoints not found; run dreamsim(pretrained=True, cache_dir='{cache}') "
            "once on a machine with internet, then copy the folder here"
        )
    return True, ""


def load_dreamsim(weights_dir: str | os.PathLike | None, device: str | torch.device = "cpu",
                  dreamsim_type: str = "ensemble") -> DreamSimNetwork:
    """DreamSim from ``weights_dir/dreamsim``; a UserError says what is missing."""
    ok, why = dreamsim_available(weights_dir)
    if not ok:
        raise UserError(f"DreamSim unavailable: {why}")
    from dreamsim import dreamsim  # optional dependency

    device = torch.device(device)
    cache = Path(weights_dir) / DREAMSIM_SUBDIR
    model, preprocess = dreamsim(pretrained=True, device=str(device), cache_dir=str(cache),
                                 dreamsim_type=dreamsim_type)
    model.eval().requires_grad_(False)
    return DreamSimNetwork(model, preprocess, device, weights=f"{DREAMSIM_SUBDIR}/{dreamsim_type}")


def _check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise UserError(f"unknown evaluation profile {profile!r}; expected one of {PROFILES}")
