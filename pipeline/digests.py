"""Content digests that follow what a step read, without re-hashing gigabytes on every run.

A step's completion record lists a full content digest of every file it *wrote*, next to that
file's size and mtime (:func:`record_outputs`). A consumer digests its inputs through
:class:`DigestCache`: a file that a producer's record describes, unchanged in size and mtime, takes the
recorded digest at no cost; anything else (a file edited after it was written, a user-supplied
file, a folder's members) is hashed in full. A folder's digest is the digest of its members' names
and digests, so a changed image inside it is seen even when the file count stays the same.

Output digests are keyed relative to the record's folder, so a results tree copied elsewhere keeps
its digests.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

_BLOCK = 2**22
_RECORD_SUFFIX = ".done.json"
# how many folders above an input are searched for the record of the step that wrote it
# (<run>/images/vdvae/0001.png → <run>/vdvae_init.done.json is two up)
_SEARCH_DEPTH = 3


def content_digest(path: str | os.PathLike) -> str:
    """sha256 of every byte of ``path`` (first 16 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def folder_members(path: Path) -> list[Path]:
    """The files a folder digest covers: every non-hidden file below it (temp files are hidden)."""
    out = []
    for p in path.rglob("*"):
        rel = p.relative_to(path)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append(p)
    return sorted(out)


def record_outputs(record_dir: Path, paths: Iterable[str | os.PathLike]) -> dict[str, list]:
    """{path relative to ``record_dir``: [size, mtime_ns, digest]} for the files a step wrote
    (folders contribute their members)."""
    record_dir = Path(record_dir).resolve()
    out: dict[str, list] = {}
    for p in paths:
        p = Path(p)
        files = folder_members(p) if p.is_dir() else [p] if p.is_file() else []
        for f in files:
            size, mtime = _stat(f)
            out[_relative(f, record_dir)] = [size, mtime, content_digest(f)]
    return out


def _relative(path: Path, root: Path) -> str:
    return os.path.relpath(Path(path).resolve(), root).replace(os.sep, "/")


class DigestCache:
    """Digests of one step's inputs; reads each producer record once.

    ``hints`` are [size, mtime_ns, digest] entries by absolute path, e.g. the inputs this consumer
    recorded last time, so a large file no step wrote is hashed once, not on every rerun.
    """

    def __init__(self, hints: dict[str, list] | None = None):
        self._records: dict[Path, list[dict[str, list]]] = {}  # folder → its records' output digests
        self.hints = dict(hints or {})
        self.seen: dict[str, list] = {}  # absolute path → [size, mtime_ns, digest] of every file digested

    def _recorded_outputs(self, folder: Path) -> list[dict[str, list]]:
        """The output digests of the records in ``folder``, listed and read once per folder (a folder
        of 1,000 images is otherwise re-listed for each of its files)."""
        if folder not in self._records:
            found = []
            try:
                candidates = sorted(folder.glob("*" + _RECORD_SUFFIX))
            except OSError:
                candidates = []
            for rec in candidates:
                try:
                    found.append(json.loads(rec.read_text()).get("output_digests") or {})
                except (OSError, ValueError, AttributeError):
                    pass
            self._records[folder] = found
        return self._records[folder]

    def _known(self, path: Path, size: int, mtime: int) -> str | None:
        for entry in (self.seen.get(str(path)), self.hints.get(str(path))):  # digested already, or last run
            if entry and entry[0] == size and entry[1] == mtime:
                return entry[2]
        folder = path.parent
        for _ in range(_SEARCH_DEPTH):
            for outputs in self._recorded_outputs(folder):
                entry = outputs.get(_relative(path, folder))
                if entry and entry[0] == size and entry[1] == mtime:
                    return entry[2]
            if folder.parent == folder:
                break
            folder = folder.parent
        return None

    def file(self, path: str | os.PathLike) -> str:
        path = Path(path).resolve()
        size, mtime = _stat(path)
        digest = self._known(path, size, mtime) or content_digest(path)
        self.seen[str(path)] = [size, mtime, digest]
        return digest

    def digest(self, path: str | os.PathLike) -> str:
        """A file's content digest; a folder's digest over its members; 'missing' when absent."""
        path = Path(path)
        if path.is_file():
            return self.file(path)
        if path.is_dir():
            h = hashlib.sha256()
            for member in folder_members(path):
                h.update(f"{member.relative_to(path).as_posix()}\0{self.file(member)}\n".encode())
            return "dir:" + h.hexdigest()[:16]
        return "missing"
