"""Reading weight files without unpickling: ``torch.load(weights_only=True)`` or safetensors."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from pipeline.errors import UserError


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException) -> str:
    """The gist of a loader's exception in one short line: the first sentence of its first line,
    never torch's advice to retry with ``weights_only=False`` (that would run arbitrary pickled code)."""
    text = _ANSI.sub("", str(exc))
    if "weights_only" in text or "Weights only load failed" in text or "WeightsUnpickler" in text:
        return f"{type(exc).__name__}: it pickles objects other than tensors, which are never unpickled"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    head = lines[0].split(". ")[0] if lines else ""
    return f"{type(exc).__name__}: {head[:200]}" if head else type(exc).__name__


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from ``.th``/``.pt``/``.pth`` or ``.safetensors``.

    A ``{"state_dict": …}`` wrapper and a ``module.`` key prefix (DataParallel) are removed. Any read
    failure, or anything but a flat dict of tensors, is a UserError naming the file and ``what``.
    The caller checks that ``path`` exists (its message says where to get the file).
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read failure is a bad file for the user
        raise UserError(f"{path}: cannot read as a {what} state dict ({first_line(exc)}); the file is "
                        "truncated or corrupt (download it again), or a module pickled whole (re-save its "
                        "state_dict())") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a flat dict of tensors (a {what} state dict)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
