"""Download exactly the NSD files the NSD prepare step reads, resumably, without AWS credentials.

The bucket ``s3://natural-scenes-dataset`` is public (AWS Open Data); files are fetched over HTTPS from
``https://natural-scenes-dataset.s3.amazonaws.com/<key>`` and laid out under ``--dest`` with the bucket's
own paths (datasets.md §1.2), which is the layout ``prepare_data.nsd`` expects.  Using the data requires
accepting the NSD Terms and Conditions (NSD Data Access form) first.

COCO captions are not taken from the NSD bucket: like ``nsd_access`` we fetch the official COCO 2017
annotation archive (``annotations_trainval2017.zip``, images.cocodataset.org) into
``nsddata_stimuli/stimuli/nsd/`` and extract only ``annotations/captions_{train,val}2017.json`` there.

Every file is written to ``<name>.part`` and renamed when its size matches the remote size, so an
interrupted run leaves no file that looks complete; the next run skips complete files and resumes
``.part`` files with an HTTP Range request (or starts over when the server ignores the range). The
transport is ``pipeline.http``'s, shared with ``models.weights``.

    python -m prepare_data.download_nsd --subjects 1 2 5 7 --sessions 37 --dest raw/nsd --dry-run
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable, Sequence

from pipeline import http
from pipeline.errors import UserError
from pipeline.http import LocalMirror, RemoteFile, _human  # noqa: F401  (the downloader's public names)
from prepare_data import nsd

BUCKET_URL = "https://natural-scenes-dataset.s3.amazonaws.com"
COCO_ANNOTATIONS_URL = "http://images.cocodataset.org/annotations/annotations_trainval2017.zip"
COCO_ZIP_KEY = "nsddata_stimuli/stimuli/nsd/annotations_trainval2017.zip"
COCO_MEMBERS = ("annotations/captions_train2017.json", "annotations/captions_val2017.json")
# Core NSD sessions completed per subject (NSD manual, "Technical notes"); 37 were public until 2023.
SESSIONS_PER_SUBJECT = {1: 40, 2: 40, 3: 32, 4: 30, 5: 40, 6: 32, 7: 40, 8: 30}


def plan(
    subjects: Iterable[int | str],
    n_sessions: int,
    include_stimuli: bool = True,
    include_captions: bool = True,
) -> list[RemoteFile]:
    """The files ``prepare_data.nsd.prepare_subject`` reads for these subjects and sessions."""
    subs = sorted({nsd.parse_subject(s) for s in subjects})
    if not subs:
        raise UserError("subjects: give at least one NSD subject (1..8)")
    if not isinstance(n_sessions, int) or n_sessions < 1:
        raise UserError(f"sessions: expected a positive integer, got {n_sessions!r}")
    for s in subs:
        if s not in SESSIONS_PER_SUBJECT:
            raise UserError(f"subject {s}: NSD has subjects 1..8")
        if n_sessions > SESSIONS_PER_SUBJECT[s]:
            raise UserError(f"subject {s}: NSD has only {SESSIONS_PER_SUBJECT[s]} sessions, {n_sessions} requested")
    files = [RemoteFile(nsd.EXPDESIGN)]
    if include_captions:
        files.append(RemoteFile(nsd.STIM_INFO))
        files.append(RemoteFile(COCO_ZIP_KEY, url=COCO_ANNOTATIONS_URL, extract=COCO_MEMBERS))
    for s in subs:
        files.append(RemoteFile(nsd.ROI.format(s=s)))
        files.extend(RemoteFile(nsd.BETAS.format(s=s, n=n)) for n in range(1, n_sessions + 1))
    if include_stimuli:
        files.append(RemoteFile(nsd.STIMULI))
    return files


class HttpTransport(http.HttpTransport):
    """``pipeline.http.HttpTransport`` reading from the public NSD bucket unless told otherwise."""

    def __init__(self, base_url: str = BUCKET_URL, timeout: float = 60.0):
        super().__init__(base_url, timeout)


def download(files: Sequence[RemoteFile], dest: str | os.PathLike, transport=None, dry_run: bool = False,
             progress: bool = True) -> dict[str, str]:
    """:func:`pipeline.http.download` from the NSD bucket by default; returns ``{key: status}``."""
    return http.download(files, dest, transport if transport is not None else HttpTransport(), dry_run=dry_run,
                         progress=progress)


# ------------------------------------------------------------------------------------------------ CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, like every other user error
        raise UserError(message)


def main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="python -m prepare_data.download_nsd", description=__doc__.split("\n")[0])
    p.add_argument("--subjects", nargs="+", default=["1", "2", "5", "7"], help="NSD subjects (default: 1 2 5 7)")
    p.add_argument("--sessions", type=int, default=37, help="betas sessions per subject (37 = Brain-Diffuser, 40 = all)")
    p.add_argument("--dest", required=True, help="local NSD root (mirrors the bucket layout)")
    p.add_argument("--dry-run", action="store_true", help="list files, states and total size; download nothing")
    p.add_argument("--no-stimuli", action="store_true", help="skip nsd_stimuli.hdf5 (~39.6 GB)")
    p.add_argument("--no-captions", action="store_true", help="skip the stimulus CSV and COCO caption files")
    p.add_argument("--mirror", default=None, help="copy from this local folder instead of the public bucket")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    try:
        args = p.parse_args(argv)
        files = plan(args.subjects, args.sessions, include_stimuli=not args.no_stimuli,
                     include_captions=not args.no_captions)
        transport = LocalMirror(args.mirror) if args.mirror else HttpTransport()
        status = download(files, args.dest, transport, dry_run=args.dry_run, progress=not args.no_progress)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if not args.dry_run:
        counts = {s: list(status.values()).count(s) for s in ("downloaded", "resumed", "skipped")}
        print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" -> {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
