"""AI-generated training captions from a vision-language model (prior-art.md §3c, Experiment 2).

Every training image is sent, as a base64 PNG, to an OpenAI-compatible chat-completions endpoint
(default ``gpt-4o-mini``; ``base_url`` points it at a locally served open model) with one of four
prompts (``prompts.toml``: high-/low-level content × short/long). Requests run in a thread pool;
rate limits (429), server errors (5xx) and connection errors are retried with exponential back-off.

Every finished (image id, prompt) pair is appended to a JSONL log *as soon as it finishes*, so an
interrupted run continues where it stopped and no paid request is repeated. A caption whose
length in CLIP tokens is outside the prompt's range is re-asked (a follow-up turn) up to
``max_reasks`` times, then recorded as ``invalid``. Log records::

    {"id": "n01443537_22563", "prompt": "low_short", "status": "ok", "caption": "...",
     "n_tokens": 21, "requests": 1, "usage": {"prompt_tokens": .., "completion_tokens": ..},
     "model": "gpt-4o-mini", "error": ""}

``status`` is ``ok``, ``invalid`` (length never fit; kept on rerun unless ``retry_invalid``) or
``error`` (an API error that survived the retries; retried on rerun). The last record of a pair wins.
Error texts are redacted of the API key. A run with failed requests writes no output for their
prompts and ends with one line (how many failed, the first server message); a rerun retries exactly
the failed requests.

Outputs, once every image of a prompt has a record: ``<out_dir>/<prompt>_captions.npy`` (unicode
(n_train, 1), '' where no valid caption exists) and ``<out_dir>/<prompt>_ids.npy`` (the training
ids in the same order), read back by :func:`ai_captions.variants.load_caption_variant`.

    python -m ai_captions.generate --data-dir data --dataset deeprecon --subject AM \\
        --prompt low_short --prompt high_short --out-dir data/deeprecon/ai_captions [--dry-run]
"""
from __future__ import annotations

import argparse
import base64
import io as _io
import json
import logging
import os
import re
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from pipeline import io
from pipeline.errors import UserError

log = logging.getLogger("recon")
PROMPTS_PATH = Path(__file__).with_name("prompts.toml")
DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
LOG_NAME = "generate_log.jsonl"
STATUSES = ("ok", "invalid", "error")
RETRY_STATUS = (408, 409, 429)  # plus every 5xx
FATAL_STATUS = (401, 403, 404)  # wrong key / no access / unknown model: stop the run, do not log per image


# ---------------------------------------------------------------------------------------------
# prompts


@dataclass(frozen=True)
class Prompt:
    """One prompt: the text sent with the image and the accepted caption length in CLIP tokens
    (counted with start/end tokens)."""

    name: str
    text: str
    clip_min: int
    clip_max: int
    max_tokens: int  # completion limit sent with the request
    reask: str  # follow-up text, formatted with n, lo, hi


def load_prompts(path: str | os.PathLike = PROMPTS_PATH) -> dict[str, Prompt]:
    """``<content>_<length>`` → Prompt for every content × length in ``path`` (e.g. ``low_short``)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
        reask = data["reask"]["text"]
        out = {}
        for content, c in data["content"].items():
            for length, ln in data["length"].items():
                out[f"{content}_{length}"] = Prompt(
                    f"{content}_{length}", f"{c['text'].strip()} {ln['suffix'].strip()}",
                    int(ln["clip_min"]), int(ln["clip_max"]), int(ln["max_tokens"]), reask.strip())
    except FileNotFoundError:
        raise UserError(f"{path}: prompts file not found") from None
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: invalid prompts file ({type(exc).__name__}: {exc})") from None
    return out


def select_prompts(names: Sequence[str] | None, path: str | os.PathLike = PROMPTS_PATH) -> list[Prompt]:
    prompts = load_prompts(path)
    names = list(names) if names else list(prompts)
    unknown = [n for n in names if n not in prompts]
    if unknown:
        raise UserError(f"{path}: unknown prompt(s) {unknown}; known: {', '.join(prompts)}")
    return [prompts[n] for n in dict.fromkeys(names)]


# ---------------------------------------------------------------------------------------------
# pieces of one request


def png_data_url(image: np.ndarray) -> str:
    """uint8 (H, W, 3) → ``data:image/png;base64,...`` (lossless, so the model sees the stimulus)."""
    from PIL import Image

    buf = _io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class ClipTokenCounter:
    """Caption length in CLIP tokens, start and end tokens included (77 = a full CLIP context).

    Uses the same cleaning and BPE as the CLIP-text features (models.clip); thread-safe.
    """

    def __init__(self, tokenizer=None):
        from models.clip_tokenizer import build_clip_tokenizer

        self.tokenizer = tokenizer if tokenizer is not None else build_clip_tokenizer()
        self._lock = threading.Lock()

    def __call__(self, text: str) -> int:
        from models.clip_tokenizer import clean_caption

        with self._lock:
            return len(self.tokenizer.tokenize(clean_caption(text))) + 2


def clean_reply(text: str | None) -> str:
    """One line, no surrounding quotes (chat models sometimes quote or wrap their answer)."""
    text = " ".join((text or "").split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off: wait min(max_delay, base_delay · 2^k) (or the server's Retry-After if
    longer) before retry k+1; give up after ``max_retries`` retries."""

    max_retries: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        d = min(self.max_delay, self.base_delay * 2 ** attempt)
        return min(self.max_delay, max(d, retry_after or 0.0))


_KEY_LIKE = re.compile(r"(sk-[A-Za-z0-9_\-]{6,}|Bearer\s+\S+)")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` on one line with every secret (the API key, echoed back by some servers) and
    anything shaped like an OpenAI key or a bearer token replaced by ``[redacted]``."""
    for secret in secrets:
        if secret and len(secret) >= 6:
            text = text.replace(secret, "[redacted]")
    return " ".join(_KEY_LIKE.sub("[redacted]", text).split())


def _status_code(exc: BaseException) -> int | None:
    code = getattr(exc, "status_code", None)
    return code if isinstance(code, int) else None


def is_retryable(exc: BaseException) -> bool:
    """429/408/409, any 5xx, and connection errors/time-outs are transient."""
    try:
        import openai

        if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
            return True
    except ImportError:  # pragma: no cover - openai is a declared extra
        pass
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    code = _status_code(exc)
    return code is not None and (code in RETRY_STATUS or code >= 500)


def _retry_after(exc: BaseException) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None)
    try:
        return float(headers.get("retry-after")) if headers is not None and headers.get("retry-after") else None
    except (TypeError, ValueError):
        return None


def call_with_retry(fn: Callable[[], Any], policy: RetryPolicy, sleep: Callable[[float], None] = time.sleep,
                    secrets: Sequence[str] = ()):
    """``fn()``, retried on transient errors with back-off; fatal errors (401/403/404) become UserError
    (with ``secrets`` redacted from the server's text)."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            code = _status_code(exc)
            if code in FATAL_STATUS:
                raise UserError(f"chat-completions request refused ({code}: {redact(str(exc), secrets)[:300]}); "
                                "check the API key, base URL and model name") from None
            if not is_retryable(exc) or attempt >= policy.max_retries:
                raise
            wait = policy.delay(attempt, _retry_after(exc))
            log.debug("retrying after %s (%.1f s)", type(exc).__name__, wait)
            sleep(wait)
            attempt += 1


# ---------------------------------------------------------------------------------------------
# the resumable log


class CaptionLog:
    """Append-only JSONL record of finished (image id, prompt) pairs; appends are thread-safe and
    flushed to disk one line at a time. A torn last line (killed mid-write) is ignored on read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()

    def read(self) -> dict[tuple[str, str], dict]:
        records: dict[tuple[str, str], dict] = {}
        if not self.path.is_file():
            return records
        bad = 0
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                    key = (str(rec["id"]), str(rec["prompt"]))
                    if rec["status"] not in STATUSES:
                        raise ValueError(rec["status"])
                except (json.JSONDecodeError, KeyError, ValueError, TypeError):
                    bad += 1
                    continue
                records[key] = rec
        if bad:
            log.warning("%s: skipped %d unreadable line(s) (an interrupted write); those pairs will be redone",
                        self.path, bad)
        return records

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())


def _needs_request(rec: dict | None, retry_invalid: bool) -> bool:
    if rec is None or rec["status"] == "error":
        return True
    return rec["status"] == "invalid" and retry_invalid


def plan(ids: Sequence, prompts: Sequence[Prompt], records: dict, retry_invalid: bool = False) -> dict[str, dict]:
    """Per prompt: counts of images total / ok / invalid / error and how many need a request now."""
    out = {}
    for p in prompts:
        recs = [records.get((str(i), p.name)) for i in ids]
        counts = {s: sum(1 for r in recs if r is not None and r["status"] == s) for s in STATUSES}
        out[p.name] = {"images": len(ids), **counts,
                       "to_request": sum(_needs_request(r, retry_invalid) for r in recs)}
    return out


# ---------------------------------------------------------------------------------------------
# generation


@dataclass
class Generator:
    """Captions images with one client; ``client`` is anything with ``chat.completions.create(**kw)``
    returning an object with ``choices[0].message.content`` (the openai client, or a test double)."""

    client: Any
    model: str = DEFAULT_MODEL
    max_reasks: int = 3
    retry: RetryPolicy = RetryPolicy()
    sleep: Callable[[float], None] = time.sleep
    detail: str = "auto"  # image detail sent to the API: 'auto' | 'low' | 'high'
    temperature: float | None = None  # None = the server's default
    counter: ClipTokenCounter | None = None

    secrets: tuple[str, ...] = ()  # redacted from every logged error text (default: the client's API key)

    def __post_init__(self):
        if self.counter is None:
            self.counter = ClipTokenCounter()
        key = getattr(self.client, "api_key", None)
        if isinstance(key, str) and key and key not in self.secrets:
            self.secrets = (*self.secrets, key)

    def error_text(self, exc: BaseException) -> str:
        """One redacted line for the log: ``<type>: <server message>``."""
        return redact(f"{type(exc).__name__}: {exc}", self.secrets)[:500]

    def caption(self, image: np.ndarray, image_id: str, prompt: Prompt) -> dict:
        """One (image, prompt) → a log record (``ok`` or ``invalid``); API errors propagate."""
        messages: list[dict] = [{"role": "user", "content": [
            {"type": "text", "text": prompt.text},
            {"type": "image_url", "image_url": {"url": png_data_url(image), "detail": self.detail}},
        ]}]
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        caption, n_tok = "", 0
        for ask in range(self.max_reasks + 1):
            kwargs: dict[str, Any] = {"model": self.model, "messages": list(messages), "max_tokens": prompt.max_tokens}
            if self.temperature is not None:
                kwargs["temperature"] = self.temperature
            resp = call_with_retry(lambda: self.client.chat.completions.create(**kwargs), self.retry, self.sleep,
                                   self.secrets)
            u = getattr(resp, "usage", None)
            for k in usage:
                usage[k] += int(getattr(u, k, 0) or 0)
            caption = clean_reply(resp.choices[0].message.content)
            n_tok = self.counter(caption)
            record = {"id": image_id, "prompt": prompt.name, "caption": caption, "n_tokens": n_tok,
                      "requests": ask + 1, "usage": usage, "model": self.model, "error": ""}
            if caption and prompt.clip_min <= n_tok <= prompt.clip_max:
                return {**record, "status": "ok"}
            messages += [{"role": "assistant", "content": caption},
                         {"role": "user", "content": prompt.reask.format(n=n_tok, lo=prompt.clip_min,
                                                                         hi=prompt.clip_max)}]
        return {**record, "status": "invalid",
                "error": f"{n_tok} CLIP tokens after {self.max_reasks} re-asks; wanted {prompt.clip_min}-{prompt.clip_max}"}


def generate_captions(gen: Generator, images: np.ndarray, ids: Sequence, prompts: Sequence[Prompt],
                      out_dir: str | os.PathLike, workers: int = 5, retry_invalid: bool = False,
                      progress: bool = True) -> dict[str, Path]:
    """Caption every (image, prompt) not yet in ``<out_dir>/generate_log.jsonl``, then write each
    complete prompt's ``<prompt>_captions.npy`` / ``<prompt>_ids.npy``.

    images: uint8 (n, H, W, 3) (may be memory-mapped); ids: (n,) in the same order.
    Returns prompt name → captions path for the prompts whose outputs were written.
    """
    if len(images) != len(ids):
        raise UserError(f"images ({len(images)}) and ids ({len(ids)}) differ in length")
    if len(set(map(str, ids))) != len(ids):
        raise UserError("image ids are not unique; captions are matched by id")
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    clog = CaptionLog(out_dir / LOG_NAME)
    records = clog.read()
    todo = [(i, p) for p in prompts for i in range(len(ids))
            if _needs_request(records.get((str(ids[i]), p.name)), retry_invalid)]
    log.info("[ai_captions] %d requests to make (%d images × %d prompts; the rest are in %s)",
             len(todo), len(ids), len(prompts), clog.path)

    def work(i: int, p: Prompt) -> dict:
        try:
            rec = gen.caption(np.asarray(images[i]), str(ids[i]), p)
        except UserError:
            raise
        except Exception as exc:  # survived the retries or is not retryable: recorded, redone on rerun
            rec = {"id": str(ids[i]), "prompt": p.name, "status": "error", "caption": "", "n_tokens": 0,
                   "requests": 0, "usage": {}, "model": gen.model, "error": gen.error_text(exc)}
        clog.append(rec)
        return rec

    pool = ThreadPoolExecutor(max_workers=workers)
    futures = [pool.submit(work, i, p) for i, p in todo]
    try:
        for fut in tqdm(as_completed(futures), total=len(futures), desc="AI captions", unit="req",
                        disable=not progress or not futures):
            fut.result()
    except BaseException:
        # stop queued requests; those in flight finish and are logged, so a rerun redoes nothing paid for
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    records = clog.read()
    written = write_outputs(out_dir, ids, prompts, records)
    failed = [records[(str(i), p.name)] for p in prompts for i in ids
              if records.get((str(i), p.name), {}).get("status") == "error"]
    if failed:  # a caption set with failed requests is not a result: no output, the task fails
        raise UserError(f"{len(failed)} of {len(ids) * len(prompts)} caption requests failed (first: "
                        f"{failed[0]['error'][:200]}); their prompts' captions were not written; rerun to retry "
                        f"exactly those {len(failed)} (log {clog.path})")
    return written


def output_paths(out_dir: str | os.PathLike, prompt: str) -> tuple[Path, Path]:
    """``(<out_dir>/<prompt>_captions.npy, <out_dir>/<prompt>_ids.npy)``."""
    out_dir = Path(out_dir)
    return out_dir / f"{prompt}_captions.npy", out_dir / f"{prompt}_ids.npy"


def write_outputs(out_dir, ids: Sequence, prompts: Sequence[Prompt], records: dict) -> dict[str, Path]:
    """Write the caption variant of every prompt whose images all have a record."""
    from pipeline.common_format import captions_array

    written = {}
    for p in prompts:
        recs = [records.get((str(i), p.name)) for i in ids]
        cap_path, ids_path = output_paths(out_dir, p.name)
        missing = sum(r is None or r["status"] == "error" for r in recs)
        if missing:  # a failed request never becomes a '' caption; an older output is no longer valid
            log.info("[ai_captions] %s: %d images without a caption (not yet asked, or failed); outputs not "
                     "written", p.name, missing)
            for stale in (cap_path, ids_path):
                stale.unlink(missing_ok=True)
            continue
        caps = [r["caption"] if r["status"] == "ok" else "" for r in recs]
        n_invalid = sum(r["status"] == "invalid" for r in recs)
        if n_invalid:
            log.warning("[ai_captions] %s: %d captions whose length never fit the prompt are '' in the output "
                        "(--retry-invalid re-asks them)", p.name, n_invalid)
        io.save_npy(ids_path, np.asarray(ids))
        io.save_npy(cap_path, captions_array([[c] for c in caps]))
        written[p.name] = cap_path
    return written


def make_client(base_url: str | None = None, api_key_env: str = DEFAULT_KEY_ENV, timeout: float = 60.0):
    """An ``openai.OpenAI`` client; its own retries are off (this module retries with back-off)."""
    key = os.environ.get(api_key_env, "")
    if not key:
        raise UserError(f"environment variable {api_key_env} is not set: put the API key there (for a local "
                        f"server without authentication any value works, e.g. {api_key_env}=none)")
    try:
        import openai
    except ImportError:
        raise UserError("the openai package is missing: pip install -e '.[captions]'") from None
    return openai.OpenAI(api_key=key, base_url=base_url or None, max_retries=0, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    from pipeline.cli import OneLineParser
    from pipeline.config import DATASET_NAMES

    p = OneLineParser(prog="python -m ai_captions.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="data", help="common-format root (paths.data_dir)")
    p.add_argument("--dataset", required=True, choices=DATASET_NAMES)
    p.add_argument("--subject", required=True, help="whose training split to caption (images are matched by id)")
    p.add_argument("--prompt", action="append", default=None, help="prompt name (repeatable; default: all)")
    p.add_argument("--prompts-file", default=str(PROMPTS_PATH))
    p.add_argument("--out-dir", default=None, help="default: <data-dir>/<dataset>/ai_captions")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    p.add_argument("--api-key-env", default=DEFAULT_KEY_ENV, help="environment variable holding the API key")
    p.add_argument("--workers", type=int, default=5, help="concurrent requests")
    p.add_argument("--max-reasks", type=int, default=3, help="re-asks for a caption of the wrong length")
    p.add_argument("--max-retries", type=int, default=RetryPolicy.max_retries)
    p.add_argument("--detail", default="auto", choices=("auto", "low", "high"), help="image detail (cost)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (a pilot run)")
    p.add_argument("--retry-invalid", action="store_true", help="re-ask pairs logged as invalid length")
    p.add_argument("--dry-run", action="store_true", help="print the number of requests and exit")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p


def main(argv: Iterable[str] | None = None, client: Any = None, sleep: Callable[[float], None] = time.sleep) -> int:
    from pipeline.cli import guarded, setup_logging
    from pipeline.common_format import read_split, subject_dir

    args = build_parser().parse_args(argv)
    setup_logging(args.debug)

    def go():
        from pipeline.config import check_name

        check_name(args.subject, "--subject")
        prompts = select_prompts(args.prompt, args.prompts_file)
        data = read_split(subject_dir(Path(args.data_dir).expanduser(), args.dataset, args.subject), "train",
                          args.subject, parts=("stim", "ids"))
        images, ids = data.stim, data.ids
        if args.limit is not None:
            images, ids = images[:args.limit], ids[:args.limit]
        out_dir = Path(args.out_dir) if args.out_dir else Path(args.data_dir) / args.dataset / "ai_captions"
        if args.dry_run:
            counts = plan(ids, prompts, CaptionLog(out_dir / LOG_NAME).read(), args.retry_invalid)
            for name, c in counts.items():
                print(f"{name}: {c['images']} images, {c['ok']} done, {c['invalid']} invalid length, "
                      f"{c['error']} failed, {c['to_request']} requests to make")
            total = sum(c["to_request"] for c in counts.values())
            print(f"total: {total} requests to make (re-asks for wrong lengths may add more); "
                  f"model {args.model}, log {out_dir / LOG_NAME}")
            return
        gen = Generator(client if client is not None else make_client(args.base_url, args.api_key_env, args.timeout),
                        model=args.model, max_reasks=args.max_reasks, retry=RetryPolicy(max_retries=args.max_retries),
                        sleep=sleep, detail=args.detail, temperature=args.temperature)
        written = generate_captions(gen, images, ids, prompts, out_dir, workers=args.workers,
                                    retry_invalid=args.retry_invalid, progress=not args.no_progress)
        for name, path in written.items():
            print(f"{name}: {path}")

    return guarded(go, args.debug)


if __name__ == "__main__":
    sys.exit(main())
