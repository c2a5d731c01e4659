"""Every path the pipeline reads or writes, built in one place from the configured roots.

Steps ask this module for paths; they never format paths themselves.

``<results_dir>/<dataset>/sub<subject>/<variant>/``
    ``features/{vdvae,cliptext,clipvision}_{train,test}.npy``
    ``features/icnn/<layer>_{train,test}.npy``, ``features/icnn/reference_std.json`` (base run only)
    ``predictions/{vdvae,cliptext,clipvision}_test.npy``
    ``predictions/icnn/<layer>_{test,train_mean}.npy``
    ``images/vdvae/NNNN.png``, ``images/versatile/NNNN.png``, ``images/icnn/NNNN.png``
    ``eval/metrics.{csv,json,png}``, ``eval/grid.png``, ``eval/per_image_<images>.csv``
    ``eval/gt_features_<profile>_<digest>.npz`` (base run only: the test images' network features)
    ``<step>.done.json`` completion records, ``config.toml`` the resolved config
``<results_dir>/<dataset>/summary/`` tables and plots across runs
``<results_dir>/experiments/<name>/`` an experiment's tasks, logs, tables and plots
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.common_format import subject_dir
from pipeline.config import BASE_VARIANT, Config

TARGETS = ("vdvae", "cliptext", "clipvision")
ICNN = "icnn"  # images/icnn, features/icnn, predictions/icnn


def dataset_results(cfg: Config) -> Path:
    """``<results_dir>/<dataset>``: every run of the configured dataset."""
    return Path(cfg.paths.results_dir).expanduser() / cfg.run.dataset


def experiment_dir(cfg: Config, name: str) -> Path:
    """``<results_dir>/experiments/<name>``: an experiment's task records, logs, tables and plots."""
    return Path(cfg.paths.results_dir).expanduser() / "experiments" / name


def summary_dir(cfg: Config) -> Path:
    """Tables and plots across the runs of a dataset."""
    return dataset_results(cfg) / "summary"


@dataclass(frozen=True)
class Layout:
    cfg: Config
    subject: str
    variant: str = BASE_VARIANT

    @property
    def dataset(self) -> str:
        return self.cfg.run.dataset

    # data (common format)
    @property
    def data_dir(self) -> Path:
        return subject_dir(Path(self.cfg.paths.data_dir).expanduser(), self.dataset, self.subject)

    # results
    def subject_results(self) -> Path:
        return dataset_results(self.cfg) / f"sub{self.subject}"

    @property
    def run_dir(self) -> Path:
        return self.subject_results() / self.variant

    def for_variant(self, variant: str) -> "Layout":
        return Layout(self.cfg, self.subject, variant)

    @property
    def base(self) -> "Layout":
        return self.for_variant(BASE_VARIANT)

    def features(self, target: str, split: str) -> Path:
        return self.run_dir / "features" / f"{target}_{split}.npy"

    def prediction(self, target: str) -> Path:
        return self.run_dir / "predictions" / f"{target}_test.npy"

    def ridge_weights(self, target: str) -> Path:
        return self.run_dir / "weights" / f"{target}_ridge.safetensors"

    def images(self, kind: str) -> Path:
        return self.run_dir / "images" / kind

    def image(self, kind: str, index: int) -> Path:
        return self.images(kind) / f"{index:04d}.png"

    def eval_dir(self) -> Path:
        return self.run_dir / "eval"

    def record(self, step: str) -> Path:
        if step == "prepare":
            return self.data_dir / "prepare.done.json"
        return self.run_dir / f"{step}.done.json"

    def variant_dir(self) -> Path:
        """Where a variant's defining files live (indices, captions, stimuli)."""
        return self.run_dir / "variant"

    # evaluation
    def metrics(self, ext: str) -> Path:
        """``eval/metrics.{json,csv,png}``: the run's metric record, table and bar plot."""
        return self.eval_dir() / f"metrics.{ext}"

    def per_image_metrics(self, kind: str) -> Path:
        return self.eval_dir() / f"per_image_{kind}.csv"

    def eval_grid(self) -> Path:
        return self.eval_dir() / "grid.png"

    def gt_features(self, profile: str, key: str) -> Path:
        """The test images' evaluation-network features, once per subject (base run) and profile;
        ``key`` is the digest of what they were computed from."""
        return self.base.eval_dir() / f"gt_features_{profile}_{key}.npz"

    # iCNN baseline
    def icnn_features_dir(self) -> Path:
        """True VGG19 features of the subject's images: the base run's, shared by all variants."""
        return self.base.run_dir / "features" / ICNN

    def icnn_features(self, layer: str, split: str) -> Path:
        return self.icnn_features_dir() / f"{layer}_{split}.npy"

    def icnn_reference_std(self) -> Path:
        """Per-layer mean feature SD of the base training images (the lab's reference statistic)."""
        return self.icnn_features_dir() / "reference_std.json"

    def icnn_predictions_dir(self) -> Path:
        return self.run_dir / "predictions" / ICNN

    def icnn_prediction(self, layer: str) -> Path:
        """Decoded (unscaled) test features of this variant."""
        return self.icnn_predictions_dir() / f"{layer}_test.npy"

    def icnn_train_mean(self, layer: str) -> Path:
        """The decoder's training mean of this variant's rows."""
        return self.icnn_predictions_dir() / f"{layer}_train_mean.npy"
