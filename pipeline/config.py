"""Typed configuration: defaults here, TOML files for what differs, flags for one-off overrides.

Defaults reproduce Brain-Diffuser exactly (../shared/spec/method.md). A config file holds only the
sections and keys it changes; ``--set section.key=value`` overrides any field. Unknown keys and
wrong types are errors that name the key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

#: The unchanged training set's variant name (``run.variant``'s default; reserved, never built).
BASE_VARIANT = "base"


@dataclass
class PathsConfig:
    data_dir: str = "data"  # common format lives in <data_dir>/<dataset>/sub<subject>/
    results_dir: str = "results"  # every step after prepare writes under <results_dir>/<dataset>/...
    weights_dir: str = "weights"  # real model weights (`make weights`)


@dataclass
class RunConfig:
    dataset: str = "nsd"
    subjects: list[str] = field(default_factory=lambda: ["1", "2", "5", "7"])
    variant: str = BASE_VARIANT  # a named training-set variant (experiments); 'base' = unchanged
    device: str = "auto"  # 'auto' → cuda if available else cpu; or 'cpu', 'cuda', 'cuda:1'
    seed: int = 0  # draws of tools outside the steps (adversarial targets); each step has its own (pipeline/seeds.py)
    tiny_models: bool = False  # deprecated: use models.mode; kept true whenever models.mode is not "real"


@dataclass
class ModelsConfig:
    """Weight locations, relative to ``paths.weights_dir`` unless absolute."""

    # "real": the published weights below; "trained-miniature": the committed tiny networks trained
    # on the synthetic images (miniature/weights, `make demo-models`); "random-tiny": seeded random
    # tiny networks (unit tests). The mode lives here so that every step reading models sees it.
    mode: str = "real"
    miniature: str = ""  # trained-miniature weights folder; '' = the committed miniature/weights
    vdvae: str = "vdvae/imagenet64-iter-1600000-model-ema.th"
    clip: str = "clip-vit-large-patch14"
    versatile: str = "versatile-diffusion"


@dataclass
class NSDConfig:
    raw_dir: str = "raw/nsd"  # a local mirror of the NSD bucket layout
    n_sessions: int = 37  # 37 reproduces 8,859 train / 982 test; 40 gives the 1,000-image test set
    captions: str = ""  # optional curated (73000, n) caption .npy; default: COCO annotation JSONs


@dataclass
class DeepreconConfig:
    raw_dir: str = "raw/deeprecon"
    file_pattern: str = "{subject}_{session}_volume_native.h5"
    session_train: str = "ImageNetTraining"
    session_test: str = "ImageNetTest"
    session_art: str = "ArtificialShapes"  # '' = no artificial-shape split
    roi: str = "ROI_VC"
    label_key: str = "stimulus_name"
    image_dir: str = ""  # '' = <raw_dir>/images
    captions: str = ""  # CSV/TSV image name → captions (human captions are not public)
    image_size: int = 0  # 0 = keep the images' own size


@dataclass
class ThingsConfig:
    raw_dir: str = "raw/things"
    rois: list[str] = field(default_factory=list)  # empty = the module's default visual ROIs
    image_dir: str = ""  # '' = <raw_dir>/images
    captions: str = ""
    source: str = "auto"  # 'auto' | 'tsv' | 'bdata'
    image_size: int = 500  # THINGS images vary in size: centre-cropped and resized to this square


@dataclass
class SyntheticConfig:
    """The bundled demo dataset: coloured shapes whose fMRI is a noisy linear read-out of the image."""

    n_train: int = 96
    n_test: int = 8
    n_voxels: int = 256
    image_size: int = 128
    noise: float = 0.5
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# the dataset registry: every dataset declared once; its config section is the Config field of the
# same name (above). CLI choices, prepare's dispatch, splits and step digest all derive from here.


@dataclass(frozen=True)
class DatasetSpec:
    """How the pipeline reaches one dataset.

    ``module`` is the prepare module, by name (so ``pipeline/`` imports no dataset code); it provides
    ``prepare_from_config(cfg, out_dir, subject, progress) -> summary dict`` and
    ``subject_table(cfg) -> str`` (``--list-subjects``).
    """

    module: str
    raw_dir: bool = True  # the section has ``raw_dir`` (the --raw-dir flag; prepare checks the folder first)
    splits: tuple[str, ...] = ("train", "test")
    optional_splits: tuple[tuple[str, str], ...] = ()  # (split, key of the section): made when that key is set

    def load(self):
        return importlib.import_module(self.module)


DATASETS: dict[str, DatasetSpec] = {
    "nsd": DatasetSpec("prepare_data.nsd"),
    "deeprecon": DatasetSpec("prepare_data.deeprecon", optional_splits=(("art", "session_art"),)),
    "things": DatasetSpec("prepare_data.things"),
    "synthetic": DatasetSpec("prepare_data.synthetic", raw_dir=False),
}
DATASET_NAMES = tuple(DATASETS)


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"run.dataset: unknown dataset {name!r} ({', '.join(DATASETS)})")
    return DATASETS[name]


def dataset_splits(cfg: "Config") -> list[str]:
    """The common-format splits ``prepare`` writes for ``cfg``'s dataset."""
    spec = dataset_spec(cfg.run.dataset)
    section = getattr(cfg, cfg.run.dataset)
    return [*spec.splits, *(split for split, key in spec.optional_splits if getattr(section, key))]


@dataclass
class FeaturesConfig:
    vdvae_groups: int = 31  # first 31 of 75 decoder groups → 91,168 dims
    vdvae_batch_size: int = 30
    clip_batch_size: int = 16
    seed: int = 0  # posterior sampling of the VDVAE latents
    max_captions: int = 5  # CLIP-text averages an image's first N non-empty captions (5 = the reference); 0 = all


@dataclass
class RidgeConfig:
    fmri_scale: float = 300.0  # NSD betas are percent signal change × 300 (also regression.ridge.FMRI_SCALE)
    alpha_vdvae: float = 5e4
    alpha_cliptext: float = 1e5
    alpha_clipvision: float = 6e4
    rescale: bool = True  # transductive re-standardisation of test predictions (method.md §4.3)
    max_memory_gb: float = 8.0  # per-chunk working memory of the ridge passes (ridge step and iCNN decoders)
    cv: bool = False  # cross-validate alpha per target group instead of the reference alphas
    cv_alphas: list[float] = field(default_factory=lambda: [1e3, 1e4, 3e4, 5e4, 1e5, 3e5, 1e6])
    save_weights: bool = False
    weights_dtype: str = "float32"


@dataclass
class VDVAEInitConfig:
    seed: int = 0  # per-image prior sampling seeds are seed + image index
    batch_size: int = 30
    output_size: int = 512  # bicubic upsampling of the 64×64 decoding
    pixels: str = "sample"  # the reference draws pixels from the DMoL head; "mean": its average pixel


@dataclass
class VersatileConfig:
    strength: float = 0.75  # noise at step int(0.75·50) = 37 of 50
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    mix_text: float = 0.4  # text share of the dual attention; vision gets 1 − mix_text = 0.6
    reference_offset: bool = True  # BD noises at t=741 and starts denoising at t=721
    reference_rng: bool = False  # one sequential torch.manual_seed stream, as the reference
    seed: int = 0
    batch_size: int = 4
    fp16: bool = True  # on CUDA only
    use_vdvae_init: bool = True  # False = "w/o VDVAE" ablation, made as without_vdvae says
    without_vdvae: str = "random_latent"  # 'random_latent' (paper p. 9: random AutoKL latent) | 'noise_image'
    use_clip_text: bool = True  # False = "w/o CLIP-Text", made as clip_ablation says
    use_clip_vision: bool = True  # False = "w/o CLIP-Vision", made as clip_ablation says
    clip_ablation: str = "mixing"  # 'mixing' (vision-only / text-only dual attention) | 'unconditional' embedding
    text_features: str = "predicted"  # 'predicted' | 'true' (usetruecliptext) | 'shuffled' (badshuffle)


@dataclass
class EvaluateConfig:
    profile: str = "braindiffuser"  # 'braindiffuser' | 'mindeye'
    batch_size: int = 16
    images: list[str] = field(default_factory=lambda: ["versatile", "vdvae"])


@dataclass
class ICNNConfig:
    """iCNN baseline (Shen et al. 2019): VGG19 feature decoding + deep-generator reconstruction."""

    layers: list[str] = field(default_factory=lambda: [
        "conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv3_4",
        "conv4_1", "conv4_2", "conv4_3", "conv4_4", "conv5_1", "conv5_2", "conv5_3", "conv5_4",
        "fc6", "fc7", "fc8"])
    alpha: float = 100.0  # ridge penalty of the feature decoders
    # 0 = all voxels, one MultiTargetRidge decomposition for every layer (default: hours → minutes);
    # > 0 = the lab's fastl2lir decoder with this many voxels selected per unit (500 in the lab;
    # one small solve per unit, ~15M units for all 19 layers: only practical for fc layers or tests)
    n_voxels: int = 0
    n_iter: int = 500
    image_size: int = 224
    lr_start: float = 2.0
    lr_end: float = 1e-10
    momentum_start: float = 0.9
    momentum_end: float = 0.9
    decay_start: float = 0.01
    decay_end: float = 0.01
    seed: int = 0
    vgg19: str = "icnn/vgg19.pt"  # relative to paths.weights_dir
    generator: str = "icnn/generator_relu7.pt"
    generator_bound: str = "icnn/generator_relu7_act_range_3x.txt"  # '' = no upper clip of the code
    batch_size: int = 8  # test images optimised together (independent per image)
    feature_batch_size: int = 16  # images per VGG19 forward when extracting features


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    nsd: NSDConfig = field(default_factory=NSDConfig)
    deeprecon: DeepreconConfig = field(default_factory=DeepreconConfig)
    things: ThingsConfig = field(default_factory=ThingsConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    ridge: RidgeConfig = field(default_factory=RidgeConfig)
    vdvae_init: VDVAEInitConfig = field(default_factory=VDVAEInitConfig)
    versatile: VersatileConfig = field(default_factory=VersatileConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    icnn: ICNNConfig = field(default_factory=ICNNConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self, sections: typing.Iterable[str] | None = None) -> str:
        """A short hash of the chosen sections or ``section.key`` fields (all when None), for
        completion records: a step's record changes only when what it reads changes."""
        full = self.to_dict()
        if sections is None:
            part = full
        else:
            part = {}
            for name in sections:
                section, _, key = name.partition(".")
                part[name] = full[section][key] if key else full[section]
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]

    def resolve_path(self, value: str, base: str | None = None) -> Path:
        """Expand ``~``; relative paths are taken relative to ``base`` (a paths field) or the CWD."""
        p = Path(value).expanduser()
        if p.is_absolute() or base is None:
            return p
        return Path(getattr(self.paths, base)).expanduser() / p

    def optional_path(self, value: str, base: str | None = None) -> Path | None:
        """:meth:`resolve_path`, with '' (not set) as None."""
        return self.resolve_path(value, base) if value else None


# ---------------------------------------------------------------------------------------------
# loading and overriding


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert one value to the field's annotated type; the error names the key."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):  # from --set: comma-separated
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, list):
            raise UserError(f"config key {key}: expected a list, got {type(value).__name__} {value!r}")
        return [coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"config key {key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise UserError(f"config key {key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise UserError(f"config key {key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise UserError(f"config key {key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config key {key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config key {key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported annotation {annotation} for {key}")


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def apply_mapping(cfg: Config, mapping: dict[str, Any], source: str = "config") -> Config:
    """Apply a nested ``{section: {key: value}}`` mapping onto ``cfg`` in place."""
    sections = _section_types(Config)
    for section, values in mapping.items():
        if section not in sections:
            raise UserError(f"{source}: unknown section [{section}]; known: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise UserError(f"{source}: [{section}] must be a table of keys")
        target = getattr(cfg, section)
        fields = _section_types(type(target))
        for key, value in values.items():
            if key not in fields:
                raise UserError(
                    f"{source}: unknown key {section}.{key}; known keys of [{section}]: {', '.join(fields)}"
                )
            setattr(target, key, coerce(value, fields[key], f"{section}.{key}"))
    return cfg


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML ({exc})") from None


MODEL_MODES = ("real", "trained-miniature", "random-tiny")


def normalise_model_mode(cfg: Config, warn: bool = True) -> Config:
    """Check ``models.mode``; map the deprecated ``run.tiny_models = true`` onto it (one warning line);
    keep ``run.tiny_models`` equal to "not the real networks" for the code that only asks that."""
    if cfg.models.mode not in MODEL_MODES:
        raise UserError(f"config key models.mode: expected one of {', '.join(MODEL_MODES)}, got {cfg.models.mode!r}")
    if cfg.run.tiny_models and cfg.models.mode == "real":
        if warn:
            import sys

            print('warning: run.tiny_models is deprecated; it now means models.mode = "random-tiny" '
                  '(the demo uses "trained-miniature")', file=sys.stderr)
        cfg.models.mode = "random-tiny"
    cfg.run.tiny_models = cfg.models.mode != "real"
    return cfg


def load_config(paths: typing.Iterable[str | Path] = (), overrides: typing.Iterable[str] = ()) -> Config:
    """Defaults ← each TOML file in order ← ``section.key=value`` overrides."""
    cfg = Config()
    for path in paths:
        data = load_toml(path)
        data.pop("include", None)
        apply_mapping(cfg, data, source=str(path))
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"--set {item!r}: expected section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        apply_mapping(cfg, {section: {key: value}}, source="--set")
    return validate(normalise_model_mode(cfg))


# ---------------------------------------------------------------------------------------------
# validation: every value range and choice, checked when a config is loaded (before any step runs)

#: Names that become folder names (subjects, variants, experiments): letters, digits and ``._+=-``,
#: not starting with a dot, so no name can climb out of its folder or hide as a dotfile.
SAFE_NAME = re.compile(r"[A-Za-z0-9_+=-][A-Za-z0-9._+=-]{0,127}")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def check_name(value: Any, what: str) -> str:
    """``value`` as a folder-safe name, or a UserError naming ``what``."""
    text = str(value)
    if not SAFE_NAME.fullmatch(text):
        raise UserError(f"{what} {text!r}: not a safe name (use letters, digits and . _ + = -, "
                        "not starting with a dot, at most 128 characters)")
    return text


# (section.key, test, what was expected)
_RULES: list[tuple[str, typing.Callable[[Any], bool], str]] = [
    ("run.dataset", lambda v: v in DATASETS, f"one of {', '.join(DATASETS)}"),
    ("run.device", lambda v: bool(_DEVICE.fullmatch(v)), "auto, cpu, mps, cuda or cuda:N"),
    ("run.subjects", lambda v: len(v) > 0, "at least one subject"),
    ("run.seed", lambda v: v >= 0, "an integer >= 0"),
    ("nsd.n_sessions", lambda v: 1 <= v <= 40, "an integer in 1..40"),
    ("deeprecon.image_size", lambda v: v >= 0, "an integer >= 0 (0 = keep the images' size)"),
    ("things.image_size", lambda v: v >= 1, "an integer >= 1"),
    ("things.source", lambda v: v in ("auto", "tsv", "bdata"), "auto, tsv or bdata"),
    ("synthetic.n_train", lambda v: v >= 2, "an integer >= 2"),
    ("synthetic.n_test", lambda v: v >= 1, "an integer >= 1"),
    ("synthetic.n_voxels", lambda v: v >= 1, "an integer >= 1"),
    ("synthetic.image_size", lambda v: v >= 8, "an integer >= 8"),
    ("synthetic.noise", lambda v: v >= 0, "a number >= 0"),
    ("synthetic.seed", lambda v: v >= 0, "an integer >= 0"),
    ("features.vdvae_groups", lambda v: 1 <= v <= 75, "an integer in 1..75"),
    ("features.vdvae_batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("features.clip_batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("features.seed", lambda v: v >= 0, "an integer >= 0"),
    ("ridge.fmri_scale", lambda v: v > 0, "a number > 0"),
    ("ridge.alpha_vdvae", lambda v: v > 0, "a number > 0"),
    ("ridge.alpha_cliptext", lambda v: v > 0, "a number > 0"),
    ("ridge.alpha_clipvision", lambda v: v > 0, "a number > 0"),
    ("ridge.max_memory_gb", lambda v: v > 0, "a number > 0"),
    ("ridge.cv_alphas", lambda v: len(v) > 0 and all(a > 0 for a in v), "a non-empty list of numbers > 0"),
    ("ridge.weights_dtype", lambda v: v in ("float16", "float32", "float64"), "float16, float32 or float64"),
    ("vdvae_init.seed", lambda v: v >= 0, "an integer >= 0"),
    ("vdvae_init.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("vdvae_init.output_size", lambda v: v >= 1, "an integer >= 1"),
    ("vdvae_init.pixels", lambda v: v in ("sample", "mean"), "sample or mean"),
    ("versatile.strength", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("versatile.num_inference_steps", lambda v: v >= 1, "an integer >= 1"),
    ("versatile.guidance_scale", lambda v: v >= 0, "a number >= 0"),
    ("versatile.mix_text", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    ("versatile.seed", lambda v: v >= 0, "an integer >= 0"),
    ("versatile.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("versatile.text_features", lambda v: v in ("predicted", "true", "shuffled"), "predicted, true or shuffled"),
    ("versatile.without_vdvae", lambda v: v in ("random_latent", "noise_image"), "random_latent or noise_image"),
    ("versatile.clip_ablation", lambda v: v in ("mixing", "unconditional"), "mixing or unconditional"),
    ("features.max_captions", lambda v: v >= 0, "an integer >= 0 (0 = all)"),
    ("evaluate.profile", lambda v: v in ("braindiffuser", "mindeye"), "braindiffuser or mindeye"),
    ("evaluate.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("evaluate.images", lambda v: len(v) > 0 and set(v) <= {"versatile", "vdvae", "icnn"},
     "a non-empty list of versatile, vdvae, icnn"),
    ("icnn.alpha", lambda v: v > 0, "a number > 0"),
    ("icnn.n_voxels", lambda v: v >= 0, "an integer >= 0 (0 = all voxels)"),
    ("icnn.n_iter", lambda v: v >= 1, "an integer >= 1"),
    ("icnn.image_size", lambda v: v >= 1, "an integer >= 1"),
    ("icnn.seed", lambda v: v >= 0, "an integer >= 0"),
    ("icnn.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("icnn.feature_batch_size", lambda v: v >= 1, "an integer >= 1"),
]


def validate(cfg: Config) -> Config:
    """Check every value range and choice (and that subject and variant names are folder-safe);
    the first problem is a UserError naming the key, what was expected and what was given."""
    for dotted, ok, expected in _RULES:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key, None)
        if value is None:  # a field another version of the config does not have
            continue
        if not ok(value):
            raise UserError(f"config key {dotted}: expected {expected}, got {value!r}")
    for s in cfg.run.subjects:
        check_name(s, "subject")
    check_name(cfg.run.variant, "variant")
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict()`` output (e.g. a saved record)."""
    return normalise_model_mode(apply_mapping(Config(), data, source="record"), warn=False)


def to_toml(cfg: Config) -> str:
    """Render the resolved config as TOML (strings, numbers, booleans and lists only)."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))

