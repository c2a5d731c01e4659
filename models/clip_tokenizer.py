"""Rebuild the OpenAI CLIP BPE tokenizer offline, from the vocabulary file open_clip ships.

transformers ships no CLIP vocabulary, and tests/demos cannot download ``openai/clip-vit-large-patch14``.
``open_clip`` (a project dependency) ships ``bpe_simple_vocab_16e6.txt.gz``, the same merges file OpenAI's
``SimpleTokenizer`` reads. From it we rebuild ``vocab.json`` (49408 entries) and ``merges.txt`` (48894 merges)
the way ``SimpleTokenizer`` builds its encoder, so the resulting ``transformers.CLIPTokenizer`` gives the same
ids as OpenAI's / open_clip's tokenizer and as the tokenizer saved with ``openai/clip-vit-large-patch14``:
256 byte symbols, the same 256 with the word-end marker ``</w>``, one token per merge in rank order, then
``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407, also the padding token).

Text cleaning: OpenAI's tokenizer (and the slow transformers tokenizer the reference used, with ``ftfy``
installed) runs ``ftfy.fix_text`` before tokenising; the transformers tokenizer built here only does NFC,
whitespace collapsing and lower-casing. ``clean_caption`` applies the ftfy step; ``models.clip`` calls it
before tokenising.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
from pathlib import Path

from transformers import CLIPTokenizer

from pipeline.io import atomic_path

VOCAB_SIZE = 49408
N_MERGES = 49152 - 256 - 2  # 48894: the merges SimpleTokenizer keeps (file lines 1..48894)
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
MAX_LENGTH = 77


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for the bytes 0..255 (in vocab order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [chr(b) for b in printable]
    extra = 0
    for b in range(256):  # the other bytes map to code points 256, 257, ... and come after, in byte order
        if b not in printable:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def bpe_file() -> Path:
    """Path of the BPE merges file shipped inside the installed open_clip package."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: open_clip's BPE vocabulary is missing; reinstall open_clip_torch")
    return path


@functools.lru_cache(maxsize=1)
def vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Build (token -> id, merges in rank order) exactly as OpenAI's SimpleTokenizer does."""
    lines = gzip.open(bpe_file()).read().decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : N_MERGES + 1])  # line 0 is a version header
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_file()}: unexpected merges file layout")
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or vocab[EOS_TOKEN] != EOS_ID:
        raise ValueError(f"rebuilt CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    return vocab, merges


def _write_files(out_dir: Path, vocab: dict[str, int], merges) -> None:
    with atomic_path(out_dir / "vocab.json") as tmp:
        tmp.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with atomic_path(out_dir / "merges.txt") as tmp:
        tmp.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")


def _read_files(out_dir: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = json.loads((out_dir / "vocab.json").read_text(encoding="utf-8"))
    lines = (out_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    return vocab, merges


def build_clip_tokenizer(out_dir: str | os.PathLike | None = None) -> CLIPTokenizer:
    """A ``transformers.CLIPTokenizer`` equal to OpenAI CLIP's (pad = ``<|endoftext|>`` = 49407, max length 77).

    With ``out_dir``, ``vocab.json``/``merges.txt`` are cached there (reused if already present) and the
    tokenizer is saved there too, so ``CLIPTokenizer.from_pretrained(out_dir)`` works afterwards.
    """
    if out_dir is None:
        vocab, merges = vocab_and_merges()
    else:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if not ((out_dir / "vocab.json").is_file() and (out_dir / "merges.txt").is_file()):
            _write_files(out_dir, *vocab_and_merges())
        vocab, merges = _read_files(out_dir)
    tok = CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m) for m in merges],
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MAX_LENGTH,
    )
    if out_dir is not None:
        tok.save_pretrained(out_dir)
    return tok


def clean_caption(text: str) -> str:
    """The cleaning the reference's tokenizer applied before BPE: ``ftfy.fix_text``, then whitespace collapsing.

    The reference used transformers 4.19's slow CLIPTokenizer with ftfy installed, which runs exactly this
    (then lower-cases, which the fast tokenizer does itself). The fast tokenizer alone would not repair
    mojibake, curly quotes or HTML entities. (open_clip additionally un-escapes HTML twice; that only
    differs for doubly escaped entities such as ``&amp;amp;``.)
    """
    import ftfy

    return " ".join(ftfy.fix_text(text).split())
