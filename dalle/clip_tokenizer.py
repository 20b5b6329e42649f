"""CLIP's own byte-level BPE tokenizer, for a converted OpenAI CLIP (:mod:`dalle.openai_clip`).

A converted CLIP must read captions exactly as it was trained to: lower-cased text,
split into words, numbers and punctuation runs, each word's UTF-8 bytes merged by the
49,152-line merge list ``bpe_simple_vocab_16e6.txt.gz`` (shipped with CLIP's code in the
``open_clip_torch`` and ``clip-anytorch`` packages; ``dalle convert openai-clip`` copies
it into the model folder), with ``</w>`` marking the end of a word.  A caption becomes
``<|startoftext|> tokens <|endoftext|>`` zero-padded to 77 ids.

Exactness: the released tokenizer repairs broken Unicode with ``ftfy`` and splits with
the ``regex`` module's Unicode classes; both are used when installed.  Without them the
text is not repaired and ``re`` stands in for the letter/number classes, which differ
only for rare characters (e.g. superscript digits are then read as letters).
"""

from __future__ import annotations

import functools
import gzip
import html
import re
from pathlib import Path
from typing import Sequence

import torch

START, END = "<|startoftext|>", "<|endoftext|>"
# Lines of the merge file used: the first (a header) is skipped, and the vocabulary
# is 49,408 entries: 256 bytes, the same with "</w>", the merges and the two specials.
N_MERGES = 49152 - 256 - 2

try:  # the released split: Unicode letter (\p{L}) and number (\p{N}) classes
    import regex as _regex

    _SPLIT = _regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        _regex.IGNORECASE,
    )
except ImportError:  # letters: word characters that are neither digits nor "_"
    _SPLIT = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+""",
                        re.IGNORECASE)


def byte_symbols() -> dict[int, str]:
    """Each byte -> a printable character (GPT-2's byte-level BPE alphabet), in the vocabulary's order.

    Printable Latin-1 bytes stand for themselves; the others (control characters, space,
    ...) are moved to code points from 256 up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean(text: str) -> str:
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class CLIPTokenizer:
    """Text -> CLIP token ids.  ``encode_batch`` gives the ``[B, context_length]`` tensor CLIP reads."""

    def __init__(self, vocab_path: str | Path, context_length: int = 77):
        self.vocab_path = Path(vocab_path)
        self.context_length = context_length
        try:
            lines = gzip.open(self.vocab_path).read().decode("utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.vocab_path} is not CLIP's gzipped BPE merge list ({e})") from None
        merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
        if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{self.vocab_path} does not hold CLIP's {N_MERGES} BPE merges")
        self.byte_to_symbol = byte_symbols()
        symbols = list(self.byte_to_symbol.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START, END]
        self.ids = {token: i for i, token in enumerate(vocab)}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.start_id, self.end_id = self.ids[START], self.ids[END]

    @property
    def vocab_size(self) -> int:
        return len(self.ids)

    @functools.lru_cache(maxsize=65536)
    def bpe(self, word: str) -> tuple[str, ...]:
        """One pre-split word (byte symbols) -> its BPE pieces, the last ending in ``</w>``."""
        if word in (START, END):
            return (word,)
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without the start and end tokens."""
        out: list[int] = []
        for word in _SPLIT.findall(clean(text)):
            symbols = "".join(self.byte_to_symbol[b] for b in word.encode("utf-8"))
            out += [self.ids[piece] for piece in self.bpe(symbols)]
        return out

    def encode_batch(self, texts: Sequence[str], training: bool = False, seed: int | None = None) -> torch.Tensor:
        """``[B, context_length]`` ids: start, tokens, end, zeros; a long caption is cut, keeping the end token.

        (``training`` and ``seed`` exist for the interface of :class:`dalle.tokenizer.TextTokenizer`;
        CLIP's BPE has no dropout.)
        """
        rows = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.start_id, *self.encode(text)][: self.context_length - 1] + [self.end_id]
            rows[i, : len(ids)] = torch.tensor(ids)
        return rows
