"""Every path the pipeline reads or writes, built in one place from the configured roots.

Steps ask this module for paths; they never format paths themselves.

``<results_dir>/<dataset>/sub<subject>/<variant>/``
    ``features/{vdvae,cliptext,clipvision}_{train,test}.npy``
    ``predictions/{vdvae,cliptext,clipvision}_test.npy``
    ``images/vdvae/NNNN.png``, ``images/versatile/NNNN.png``
    ``eval/metrics.{csv,json}``
    ``<step>.done.json`` completion records, ``config.toml`` the resolved config
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.common_format import subject_dir
from pipeline.config import Config

TARGETS = ("vdvae", "cliptext", "clipvision")


@dataclass(frozen=True)
class Layout:
    cfg: Config
    subject: str
    variant: str = "base"

    @property
    def dataset(self) -> str:
        return self.cfg.run.dataset

    # data (common format)
    @property
    def data_dir(self) -> Path:
        return subject_dir(Path(self.cfg.paths.data_dir).expanduser(), self.dataset, self.subject)

    # results
    def subject_results(self) -> Path:
        return Path(self.cfg.paths.results_dir).expanduser() / self.dataset / f"sub{self.subject}"

    @property
    def run_dir(self) -> Path:
        return self.subject_results() / self.variant

    def for_variant(self, variant: str) -> "Layout":
        return Layout(self.cfg, self.subject, variant)

    @property
    def base(self) -> "Layout":
        return self.for_variant("base")

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

