"""One run at a time per step and output folder, and no temp files left behind by a killed run.

The lock is an ``fcntl.flock`` on ``<step>.lock`` beside the step's completion record: the kernel
releases it when its holder dies, even by SIGKILL, so a stale lock never blocks a rerun. The file
holds the holder's pid, host and start time, which a second run names when it refuses to start.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import re
import socket
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.errors import UserError

# pipeline.io.atomic_path names its temporaries ".<name>.<8 random chars>.tmp<suffix>"
_TEMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp(\.[^.]+)?$")


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')} (since {info.get('since')})"


@contextlib.contextmanager
def step_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block; a held lock is a one-line UserError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{path.parent}: cannot create the output folder ({exc.strerror})") from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise UserError(f"{path}: cannot create the lock file ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{path}: {what} is being run by {_holder(path)}; wait for it or stop it "
                            "(two runs must not write one output folder)") from None
        # the holder before us may have unlinked the file between our open and our lock
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": _dt.datetime.now().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(info) + "\n").encode())
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def remove_stale_temps(outputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Delete the temporaries that a killed run left for these output files; returns what it removed.

    Only temp files named after one of ``outputs`` are touched (call it while holding the step's
    lock, so no live writer owns them).
    """
    by_folder: dict[Path, set[str]] = {}
    for p in outputs:
        p = Path(p)
        by_folder.setdefault(p.parent, set()).add(p.name)
    removed = []
    for folder, names in by_folder.items():
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            m = _TEMP.match(entry.name)
            if m and m.group("name") in names and entry.is_file():
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed.append(entry)
    return removed
