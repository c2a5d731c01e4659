"""Per-image resume: one rule for every step that writes one file per image (``vdvae_init``,
``versatile``, ``icnn_recon``).

The runner decides whether the files already on disk may be kept (``Context.resume``: a completion or
start record shows they were made by this config and these inputs). When they may, only the missing
images are made; when they may not, all are made. Image i always draws from its own seed, so which
images are redone does not change any image.

``remove_stale=True`` (the iCNN reconstruction, as its stage always did) also deletes the existing
images before a run that may not keep them: a fresh run that is interrupted then leaves only its
own images, which a resume may keep. Without it (vdvae_init, versatile) the old images stay until
they are overwritten, so a fresh run interrupted and then resumed with the same inputs keeps the old
images it had not reached yet.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

log = logging.getLogger("recon")


def pending(paths: Sequence[Path], resume: bool, step: str = "", verb: str = "making",
            remove_stale: bool = False) -> list[int]:
    """Indices of ``paths`` to (re)make: the absent ones when resuming, else all of them (the existing
    ones deleted first with ``remove_stale``). ``step`` and ``verb`` name the work in the log line said
    when some images are kept."""
    paths = [Path(p) for p in paths]
    if not resume:
        if remove_stale:
            for p in paths:
                p.unlink(missing_ok=True)
        return list(range(len(paths)))
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    if todo and len(todo) < len(paths):
        log.info("[%s] %d of %d images exist, %s the other %d", step, len(paths) - len(todo), len(paths), verb,
                 len(todo))
    return todo
