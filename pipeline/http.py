"""Resumable, verified file downloads over HTTPS (or from a local mirror): the one transport the
NSD downloader (``prepare_data.download_nsd``) and the weights manager (``models.weights``) share.

Every file is written to ``<name>.part`` and renamed when its size matches the remote size (and, where
the source publishes one, its md5/sha256), so an interrupted run leaves no file that looks complete;
the next run skips complete files and resumes ``.part`` files with an HTTP Range request (or starts
over when the server ignores the range). Plumbing: imports only ``pipeline.errors`` and ``pipeline.io``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

from tqdm.auto import tqdm

from pipeline import io
from pipeline.errors import UserError

CHUNK_BYTES = 1 << 20

@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: ``key`` is its path under the destination (= its bucket key).

    ``url`` overrides the bucket URL (COCO archive); ``extract`` names zip members to unpack next to it;
    ``unpack`` maps a zip member (by the end of its path inside the archive) to a destination key, for
    archives whose inner names differ from the names the config expects. ``md5`` / ``sha256`` are the
    published digests (``sha256`` may be a published prefix of at least 8 hex digits, e.g.
    torchvision's file-name hashes): a download that does not match is deleted and is an error.
    """

    key: str
    size: int | None = None
    url: str | None = None
    extract: tuple[str, ...] = ()
    md5: str | None = None
    sha256: str | None = None
    unpack: tuple[tuple[str, str], ...] = ()


# ------------------------------------------------------------------------------------------ transports


class HttpTransport:
    """Anonymous HTTPS reads (urllib; sizes by HEAD, resume by Range). A file without its own ``url``
    is read from ``<base_url>/<key>`` (the NSD bucket for ``prepare_data.download_nsd``)."""

    def __init__(self, base_url: str = "", timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def url(self, f: RemoteFile) -> str:
        if not f.url and not self.base_url:
            raise UserError(f"{f.key}: no URL to download it from")
        return f.url or f"{self.base_url}/{f.key}"

    def _open(self, f: RemoteFile, method: str = "GET", headers: dict | None = None):
        req = urllib.request.Request(self.url(f), method=method, headers={"User-Agent": "recon-diffuser", **(headers or {})})
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raise UserError(f"{self.url(f)}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise UserError(f"{self.url(f)}: cannot connect ({getattr(exc, 'reason', exc)})") from None

    def size(self, f: RemoteFile) -> int | None:
        """The remote size: HEAD's Content-Length, or, where HEAD is refused or says nothing (figshare's
        presigned redirects), a one-byte ranged GET's ``Content-Range: bytes 0-0/<size>``."""
        try:
            with self._open(f, "HEAD") as resp:
                length = resp.headers.get("Content-Length")
            if length is not None:
                return int(length)
        except UserError:
            pass
        with self._open(f, headers={"Range": "bytes=0-0"}) as resp:
            total = (resp.headers.get("Content-Range") or "").rpartition("/")[2]
            if resp.status == 206 and total.isdigit():
                return int(total)
            length = resp.headers.get("Content-Length")  # Range ignored: the whole file's length
            return int(length) if resp.status == 200 and length is not None else None

    def fetch(self, f: RemoteFile, offset: int = 0) -> tuple[int, Iterator[bytes]]:
        """Return (start, chunks): the bytes from ``start``, which is ``offset`` or 0 if Range is ignored."""
        resp = self._open(f, headers={"Range": f"bytes={offset}-"} if offset else None)
        start = offset if (offset and resp.status == 206) else 0

        def chunks() -> Iterator[bytes]:
            with resp:
                while block := resp.read(CHUNK_BYTES):
                    yield block

        return start, chunks()


class LocalMirror:
    """Copy from a local folder laid out like the bucket (tests; users with a copy on another disk)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, f: RemoteFile) -> Path:
        return self.root / f.key

    def size(self, f: RemoteFile) -> int | None:
        path = self.path(f)
        if not path.is_file():
            raise UserError(f"{path}: not in the local mirror")
        return path.stat().st_size

    def fetch(self, f: RemoteFile, offset: int = 0) -> tuple[int, Iterator[bytes]]:
        path = self.path(f)
        if not path.is_file():
            raise UserError(f"{path}: not in the local mirror")

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as fh:
                fh.seek(offset)
                while block := fh.read(CHUNK_BYTES):
                    yield block

        return offset, chunks()


# ------------------------------------------------------------------------------------------- download


def _part_path(final: Path) -> Path:
    return final.with_name(final.name + ".part")


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "?"


def _fetch_one(f: RemoteFile, final: Path, transport, progress: bool) -> str:
    """Bring one file to ``final`` through ``final.part``; return 'downloaded' or 'resumed'."""
    part = _part_path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.is_file() else 0
    if f.size is not None and offset > f.size:
        offset = 0  # longer than the remote file: not ours to resume
    if f.size is not None and offset == f.size:
        start = offset
    else:
        start, chunks = transport.fetch(f, offset)
        written = start
        with open(part, "r+b" if part.exists() else "wb") as fh:
            fh.truncate(start)
            fh.seek(start)
            bar = tqdm(total=f.size, initial=start, unit="B", unit_scale=True, desc=Path(f.key).name,
                       disable=not progress, leave=False)
            try:
                for block in chunks:
                    fh.write(block)
                    written += len(block)
                    bar.update(len(block))
            except (OSError, urllib.error.URLError) as exc:
                raise UserError(f"{f.key}: download interrupted after {written} bytes ({exc}); run again to resume") from None
            finally:
                bar.close()
                fh.flush()
                os.fsync(fh.fileno())
    got = part.stat().st_size
    if f.size is not None and got != f.size:
        part.unlink()
        raise UserError(f"{f.key}: got {got} bytes but the remote file has {f.size}; removed the partial file, run again")
    verify(f, part)
    os.replace(part, final)
    return "resumed" if start > 0 else "downloaded"


def file_digests(path: Path, algorithms: Sequence[str]) -> dict[str, str]:
    """{algorithm: hex digest} of ``path``, read once in 1 MiB chunks."""
    hashes = {a: hashlib.new(a) for a in algorithms}
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK_BYTES):
            for h in hashes.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hashes.items()}


def verify(f: RemoteFile, path: Path) -> None:
    """Check ``path`` against ``f``'s published md5/sha256 (a sha256 prefix checks its leading digits);
    on a mismatch the file is deleted and the error names both digests."""
    wanted = {a: v.lower() for a, v in (("md5", f.md5), ("sha256", f.sha256)) if v}
    if not wanted:
        return
    got = file_digests(path, list(wanted))
    for algo, want in wanted.items():
        if not got[algo].startswith(want):
            path.unlink(missing_ok=True)
            raise UserError(f"{f.key}: {algo} {got[algo][:len(want)]} does not match the published {want}; the "
                            "download is corrupt or the source changed (file not kept; run again)")


def _extract(f: RemoteFile, archive: Path, dest: Path) -> None:
    """Unpack the named members next to the archive (atomically, missing ones only)."""
    base = dest / Path(f.key).parent
    todo = [m for m in f.extract if not (base / m).is_file()]
    if not todo:
        return
    try:
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            for member in todo:
                if member not in names:
                    raise UserError(f"{archive}: member {member!r} missing from the archive")
                with io.atomic_path(base / member) as tmp, zf.open(member) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK_BYTES)
    except zipfile.BadZipFile as exc:
        raise UserError(f"{archive}: not a valid zip archive ({exc}); delete it and run again") from None


def _unpack(f: RemoteFile, archive: Path, dest: Path) -> None:
    """Copy each ``(member suffix, key)`` of ``f.unpack`` out of the zip to ``dest/key`` (atomically,
    missing ones only): the archive's inner folder names are not the layout the config expects."""
    todo = [(suffix, key) for suffix, key in f.unpack if not (dest / key).is_file()]
    if not todo:
        return
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            for suffix, key in todo:
                hits = [n for n in names if n == suffix or n.endswith("/" + suffix)]
                if len(hits) != 1:
                    raise UserError(f"{archive}: expected one member ending in {suffix!r}, found {len(hits)}")
                with io.atomic_path(dest / key) as tmp, zf.open(hits[0]) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK_BYTES)
    except zipfile.BadZipFile as exc:
        raise UserError(f"{archive}: not a valid zip archive ({exc}); delete it and run again") from None


def download(
    files: Sequence[RemoteFile],
    dest: str | os.PathLike,
    transport=None,
    dry_run: bool = False,
    progress: bool = True,
) -> dict[str, str]:
    """Fetch ``files`` under ``dest`` (resumable); return ``{key: status}``.

    Status is 'skipped' (complete file present), 'resumed' (continued a ``.part``), 'downloaded', or
    for a dry run 'present' / 'partial' / 'missing' (the plan and total size are printed).
    """
    dest = Path(dest)
    transport = transport if transport is not None else HttpTransport()
    status: dict[str, str] = {}
    if dry_run:
        total, unknown, why = 0, 0, ""
        for f in files:
            size = f.size
            if size is None:
                try:
                    size = transport.size(f)
                except UserError as exc:
                    size, why = None, why or str(exc)
            final = dest / f.key
            state = "present" if final.is_file() else "partial" if _part_path(final).is_file() else "missing"
            status[f.key] = state
            if size is None:
                unknown += 1
            else:
                total += size
            print(f"{_human(size):>10}  {state:<8}  {f.key}" + (f"  (from {f.url})" if f.url else ""))
        note = f" (+ {unknown} files of unknown size; first problem: {why})" if unknown else ""
        print(f"{len(files)} files, {_human(total)} in total{note} -> {dest}")
        return status

    for f in tqdm(files, desc="files", unit="file", disable=not progress):
        final = dest / f.key
        if f.size is None:
            f = replace(f, size=transport.size(f))
        if final.is_file() and (f.size is None or final.stat().st_size == f.size):
            status[f.key] = "skipped"
        else:
            status[f.key] = _fetch_one(f, final, transport, progress)
        if f.extract:
            _extract(f, final, dest)
        if f.unpack:
            _unpack(f, final, dest)
    return status
