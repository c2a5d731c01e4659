"""Per-image resume: one rule for every step that writes one file per image (``vdvae_init``,
``versatile``, ``icnn_recon``).

The runner decides whether the files already on disk may be kept (``Context.resume``: a completion or
start record shows they were made by this config and these inputs). When they may, only the missing
images are made; when they may not, all are made. Image i always draws from its own seed, so which
images are redone does not change any image.

A run that may not keep them deletes the existing images first. Otherwise a fresh run interrupted
after a config change would leave the old setting's images beside its own, and the resume that
follows (its start record matches) would keep them as if they were this run's.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

log = logging.getLogger("recon")


def pending(paths: Sequence[Path], resume: bool, step: str = "", verb: str = "making") -> list[int]:
    """Indices of ``paths`` to (re)make: the absent ones when resuming, else all of them (the existing
    ones deleted first). ``step`` and ``verb`` name the work in the log line said when some images
    are kept."""
    paths = [Path(p) for p in paths]
    if not resume:
        for p in paths:
            p.unlink(missing_ok=True)
        return list(range(len(paths)))
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    if todo and len(todo) < len(paths):
        log.info("[%s] %d of %d images exist, %s the other %d", step, len(paths) - len(todo), len(paths), verb,
                 len(todo))
    return todo
