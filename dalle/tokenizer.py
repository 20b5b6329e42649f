"""The text tokenizer: lower-cased byte-pair encoding with per-position padding.

DALL-E (Ramesh et al. 2021, section 2.2) lower-cases each caption, encodes it with
BPE into at most 256 tokens from a 16,384-token vocabulary, and fills the positions
past the caption with a padding token *of its own for each position*, so the
transformer always sees ``text_len`` text tokens and can tell where the caption
ended.  It trains with BPE dropout (10%, Provilkov et al. 2020): each merge is
skipped with that probability, so the model also learns from finer segmentations.

Ids, as everywhere in the package::

    [0, vocab_size)                       BPE tokens; id 0 is "<unk>"
    [vocab_size, vocab_size + text_len)   padding: position i holds vocab_size + i

Two learners live here:

* :class:`TextTokenizer` is the production tokenizer.  Its BPE model is trained and
  applied by the Rust ``tokenizers`` library, for speed (batch encoding runs on all
  cores) and because it implements BPE dropout.
* :func:`learn_bpe` is a small, pure-Python reference learner of the same algorithm,
  written to be read (and to pin down the worked example in the tests).
"""

from __future__ import annotations

import json
import operator
import random
import string
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dalle.config import ConfigError, TokenizerConfig
from dalle.io import (ModelLoadError, atomic_write, load_config_with_checksums, save_config_with_checksums,
                      verify_checksum)

__all__ = ["EOW", "UNK", "EncodeResult", "TextTokenizer", "learn_bpe", "read_caption_file"]

EOW = "</w>"  # marks the end of a word (a token "red</w>" ends a word; "re" does not)
UNK = "<unk>"  # a character the training captions never showed; always id 0
SPECIAL_TOKENS = (UNK,)
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"

# Characters every trained vocabulary holds (alone and word-final), whether the
# captions used them or not, so that typed prompts with digits or punctuation
# round-trip instead of turning into <unk>.  Upper case is absent: it is normalised away.
ALWAYS_KNOWN = string.ascii_lowercase + string.digits + string.punctuation


# --- the reference learner -----------------------------------------------------------


def learn_bpe(word_counts: Mapping[str, int], num_merges: int) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Learn ``num_merges`` BPE merges from word counts (Sennrich et al. 2016), in pure Python.

    The algorithm:

    1. Split each word into its characters followed by the end-of-word symbol
       ``"</w>"`` (a symbol of its own): ``"old"`` -> ``o l d </w>``.
    2. Count every pair of adjacent symbols, each occurrence weighted by its word's count.
    3. Merge the most frequent pair into one new symbol everywhere it occurs (left to
       right, so ``a a a`` becomes ``aa a``), record the merge, and go back to 2.
       Ties go to the pair seen first when scanning the words in the mapping's order,
       each word left to right (deterministic, and independent of string order).
    4. Stop after ``num_merges`` merges, or earlier once every word is a single symbol.

    Returns ``(merges, token_counts)``: the merges as ``(left, right)`` pairs in the
    order learned, and how often each symbol occurs in the segmented words afterwards
    (weighted by word count; symbols that no longer occur are left out).

    Worked example (tested)::

        >>> merges, counts = learn_bpe({"old": 7, "older": 3, "finest": 9, "lowest": 4}, 5)
        >>> merges
        [('e', 's'), ('es', 't'), ('est', '</w>'), ('o', 'l'), ('ol', 'd')]
        >>> counts["est</w>"], counts["old"], counts["</w>"]
        (13, 10, 10)

    Relation to :class:`TextTokenizer`: it is the same algorithm (repeatedly merge the
    most frequent adjacent pair, word ends marked with ``</w>``), and the production
    tokenizer splits text with the merges exactly as step 3 does.  The production
    learner comes from the ``tokenizers`` library because it is fast on millions of
    captions and implements BPE dropout.  Two bookkeeping details differ there, so the
    merge lists are not identical: the library glues ``</w>`` to the last character
    from the start (``o l d</w>``, so it learns ``('es', 't</w>')`` rather than
    ``('est', '</w>')``) and it breaks ties its own way.

    Words with count 0 are ignored.  Raises ``ValueError`` for an empty word, a word with
    whitespace or ``"</w>"`` in it, a negative count, or a negative ``num_merges``.
    """
    try:
        num_merges = operator.index(num_merges)
    except TypeError:
        raise TypeError(f"num_merges must be an integer, got {num_merges!r}") from None
    if num_merges < 0:
        raise ValueError(f"num_merges must be >= 0, got {num_merges}")
    words: list[tuple[list[str], int]] = []
    for word, count in word_counts.items():
        if not isinstance(word, str) or not word or any(c.isspace() for c in word) or EOW in word:
            raise ValueError(f"learn_bpe needs non-empty words without whitespace or {EOW!r}; got {word!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"the count of {word!r} must be an integer >= 0, got {count!r}")
        if count:
            words.append(([*word, EOW], count))

    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pair_counts: dict[tuple[str, str], int] = {}  # insertion order = order first seen
        for symbols, count in words:
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] = pair_counts.get(pair, 0) + count
        if not pair_counts:
            break  # every word is one symbol: nothing left to merge
        best = max(pair_counts, key=pair_counts.__getitem__)  # max() keeps the first of equals
        merges.append(best)
        left, right = best
        for symbols, _ in words:
            i = 0
            while i < len(symbols) - 1:
                if symbols[i] == left and symbols[i + 1] == right:
                    symbols[i : i + 2] = [left + right]
                i += 1

    token_counts: dict[str, int] = {}
    for symbols, count in words:
        for symbol in symbols:
            token_counts[symbol] = token_counts.get(symbol, 0) + count
    return merges, token_counts


# --- the production tokenizer --------------------------------------------------------


class EncodeResult(NamedTuple):
    """One encoded caption: ``ids`` (length ``text_len``) and how many tokens truncation cut."""

    ids: list[int]
    num_truncated: int


def check_tokenizer_config(config: TokenizerConfig) -> None:
    """Raise :class:`ConfigError` if ``config`` cannot describe a tokenizer."""
    if not isinstance(config, TokenizerConfig):
        raise ConfigError(f"expected a TokenizerConfig, got {type(config).__name__}")
    problems = []
    for name in ("vocab_size", "text_len"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r}")
    if isinstance(config.vocab_size, int) and config.vocab_size <= len(SPECIAL_TOKENS):
        problems.append(f"vocab_size={config.vocab_size} leaves no room beside the special tokens {SPECIAL_TOKENS}")
    dropout = config.bpe_dropout
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        problems.append(f"bpe_dropout must be in [0, 1), got {dropout!r}")
    if problems:
        raise ConfigError("tokenizer config: " + "; ".join(problems))


def _empty_tokenizer() -> Tokenizer:
    """The untrained pipeline: NFKC + lower case, split on whitespace, BPE with ``</w>``."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK, end_of_word_suffix=EOW))
    # NFKC folds compatibility forms (full-width "ＲＥＤ", ligatures "ﬁ", non-breaking
    # spaces, superscripts) and composes "e" + combining accent into "é", so text
    # typed or pasted from anywhere gets the tokens the training captions had.  Unlike
    # NFKD + accent stripping it keeps accents and non-Latin scripts, which decode
    # then gives back unchanged.
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # Words are whitespace-separated runs; punctuation stays in its word ("circle."),
    # which keeps decoding lossless: decode joins words with single spaces.
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.BPEDecoder(suffix=EOW)
    return tokenizer


def _canonical_ids(tokenizer: Tokenizer) -> Tokenizer:
    """The trained tokenizer renumbered: special tokens, then the alphabet sorted, then merges in order.

    The library numbers the word-final characters ("e</w>") in hash-map iteration
    order, which changes from run to run (huggingface/tokenizers#1794): two trainings
    on the same captions gave the same tokens under different ids, so two identical
    ``dalle train all`` runs trained different text embeddings.  The merges, and so
    every segmentation, are unchanged.
    """
    data = json.loads(tokenizer.to_str())
    model = data["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    specials = [t["content"] for t in sorted(data["added_tokens"], key=operator.itemgetter("id"))]
    merged = list(dict.fromkeys(left + right for left, right in merges))
    taken = set(specials) | set(merged)
    alphabet = sorted(token for token in model["vocab"] if token not in taken)
    order = specials + alphabet + merged
    if sorted(order) != sorted(model["vocab"]):  # pragma: no cover - a library format change
        raise RuntimeError("renumbering the trained BPE vocabulary would change it; check the tokenizers version")
    model["vocab"] = {token: i for i, token in enumerate(order)}
    for added in data["added_tokens"]:
        added["id"] = model["vocab"][added["content"]]
    return Tokenizer.from_str(json.dumps(data))


class TextTokenizer:
    """Caption text <-> ``text_len`` ids: lower-cased BPE, then per-position padding.

    Build one with :meth:`train` or :meth:`from_pretrained`.

    Defined behaviour on awkward text:

    * Text is normalised with NFKC and lower-cased, and whitespace runs separate
      words; :meth:`decode` gives back that normalised text with single spaces
      (:meth:`normalize` computes it).  Punctuation stays part of its word.
    * Empty or all-whitespace text encodes to ``text_len`` padding ids and decodes to "".
    * Non-ASCII text (accents, other scripts, emoji) is handled like any other: the
      characters the training captions used are in the vocabulary, as are
      lower-case ASCII letters, digits and punctuation, and those round-trip exactly.
      Any other character (say an emoji the captions never used) becomes ``<unk>``
      (id 0), one per character; decoding drops it.  An emoji made of several code
      points (skin tone, ZWJ sequences) is several characters.
    * Text longer than ``text_len`` tokens keeps its first ``text_len`` tokens (so no
      padding id follows it); :meth:`encode_with_info` says how many were cut and
      :meth:`encode_batch` warns.
    * ``<unk>`` typed literally in a caption is ordinary text, not the special token.

    ``training=True`` applies BPE dropout (``config.bpe_dropout``): each merge is
    skipped with that probability, so the same caption is segmented differently from
    call to call.  ``training=False`` (the default) is deterministic.  The library's
    dropout draws from an unseeded random generator; pass ``seed=`` to get
    reproducible dropout (done in Python, slower, same algorithm) where runs must be
    repeatable, such as training loops that resume exactly.
    """

    cache_size: int = 1 << 16
    """Captions whose (dropout-free) ids are remembered; 0 turns the cache off.  Once full,
    the cache keeps what it has: about 20 MB for short captions, at most about 60 MB
    (captions over 256 characters are not cached)."""

    def __init__(self, tokenizer: Tokenizer, config: TokenizerConfig):
        check_tokenizer_config(config)
        self._check_model(tokenizer, config)
        self.config = config
        self._tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self._tokenizer.encode_special_tokens = True  # "<unk>" in a caption is plain text
        self._tokenizer.model.dropout = None  # whatever the file said: inference is deterministic
        # A second copy with dropout for training: setting ``dropout`` on the shared
        # model would make inference random too (and the library skips its word
        # cache when dropout is on, so inference would also be slower).
        self._dropout_tokenizer = Tokenizer.from_str(self._tokenizer.to_str())
        self._dropout_tokenizer.encode_special_tokens = True
        self._dropout_tokenizer.model.dropout = float(config.bpe_dropout) if config.bpe_dropout > 0 else None
        self._pad_row = np.arange(config.vocab_size, config.vocab_size + config.text_len, dtype=np.int64)
        self._python_bpe: _PythonBPE | None = None  # built on the first seeded call
        # Inference encoding is a pure function of the text, and captions repeat (the
        # shapes set has a few thousand distinct ones), so remember recent results.
        self._cache: dict[str, tuple[int, ...]] = {}

    @staticmethod
    def _check_model(tokenizer: Tokenizer, config: TokenizerConfig) -> None:
        model = tokenizer.model
        if not isinstance(model, models.BPE):
            raise ModelLoadError(f"expected a BPE tokenizer, got a {type(model).__name__} model")
        if model.end_of_word_suffix != EOW or tokenizer.token_to_id(UNK) != 0:
            raise ModelLoadError(f"the BPE model must mark word ends with {EOW!r} and have {UNK!r} as id 0 "
                                 f"(got suffix {model.end_of_word_suffix!r}, {UNK} id {tokenizer.token_to_id(UNK)})")
        vocab = tokenizer.get_vocab()
        top = max(vocab.values(), default=-1)
        if len(vocab) > config.vocab_size or top >= config.vocab_size:
            raise ModelLoadError(f"the BPE vocabulary has {len(vocab)} tokens (largest id {top}) but the config "
                                 f"says vocab_size={config.vocab_size}; ids must stay below vocab_size")

    # --- building, saving, loading -----------------------------------------------------

    @classmethod
    def train(cls, captions: Iterable[str], config: TokenizerConfig) -> TextTokenizer:
        """Learn a BPE vocabulary of at most ``config.vocab_size`` tokens from ``captions``.

        ``captions`` is iterated once (a generator is fine).  On a small corpus the
        vocabulary may come out smaller than ``vocab_size``; ids still stay below it.
        Raises ``ValueError`` when there is no text at all, ``TypeError`` for a caption
        that is not a string, and :class:`ConfigError` when ``vocab_size`` cannot even
        hold the characters (each alone and word-final) plus the special tokens.
        """
        check_tokenizer_config(config)
        if isinstance(captions, (str, bytes)):
            raise TypeError("captions must be an iterable of caption strings, not a single string")
        seen_chars: set[str] = set()
        n_captions = 0

        def corpus() -> Iterator[str]:
            nonlocal n_captions
            for i, caption in enumerate(captions):
                if not isinstance(caption, str):
                    raise TypeError(f"caption {i} is a {type(caption).__name__}, not a str: {caption!r:.80}")
                seen_chars.update(caption)
                n_captions += 1
                yield caption
            # The library glues "</w>" to a word's last character, so a character
            # seen only inside words ("q" in "square") would be <unk> at a word's end.
            # One extra line with every known character as a word of its own adds
            # each word-final form; it holds no pairs, so no merge changes.
            # (Each character is normalised alone: NFKC would compose neighbours.)
            if any(not c.isspace() for c in seen_chars):
                # (A normaliser of its own: the one being trained is locked meanwhile.)
                normalizer = _empty_tokenizer().normalizer
                known = {n for c in seen_chars for n in normalizer.normalize_str(c)}
                yield " ".join(sorted(known.union(ALWAYS_KNOWN)))

        tokenizer = _empty_tokenizer()
        trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            end_of_word_suffix=EOW,
            show_progress=False,
        )
        tokenizer.train_from_iterator(corpus(), trainer)
        if not tokenizer.get_vocab_size() or n_captions == 0 or all(c.isspace() for c in seen_chars):
            raise ValueError("no caption text to train the tokenizer on (the captions are empty)")
        if tokenizer.get_vocab_size() > config.vocab_size:
            raise ConfigError(
                f"vocab_size={config.vocab_size} is too small: the captions' characters alone (each also in "
                f"its word-final form) plus {len(SPECIAL_TOKENS)} special token(s) need "
                f"{tokenizer.get_vocab_size()} ids; raise tokenizer.vocab_size"
            )
        return cls(_canonical_ids(tokenizer), config)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write ``folder/tokenizer.json`` (the library's format) and ``folder/config.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        text = self._tokenizer.to_str(pretty=True)
        atomic_write(folder / TOKENIZER_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        save_config_with_checksums(self.config, folder / CONFIG_FILE, [folder / TOKENIZER_FILE])
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> TextTokenizer:
        """Load what :meth:`save_pretrained` wrote; :class:`ModelLoadError` says what is missing or wrong."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError(f"tokenizer folder {folder} does not exist (train one with: dalle train tokenizer)")
        try:
            config, checksums = load_config_with_checksums(TokenizerConfig, folder / CONFIG_FILE)
            check_tokenizer_config(config)
        except ConfigError as e:
            raise ModelLoadError(f"cannot load the tokenizer config: {e}") from None
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise ModelLoadError(f"missing {path} (retrain the tokenizer or copy the file back)")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for unreadable files
            raise ModelLoadError(f"{path} is not a readable tokenizers file ({e}); retrain the tokenizer") from None
        verify_checksum(path, checksums)  # readable, but is it the file that was exported?
        return cls(tokenizer, config)

    # --- sizes and special ids -----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Ids reserved for BPE tokens and special tokens (the trained vocabulary may use fewer)."""
        return self.config.vocab_size

    @property
    def text_len(self) -> int:
        return self.config.text_len

    @property
    def total_vocab(self) -> int:
        """BPE ids plus one padding id per position: the text embedding table's size."""
        return self.config.total_vocab

    @property
    def unk_id(self) -> int:
        return 0

    def pad_id(self, position: int) -> int:
        """The padding id of text position ``position`` (``vocab_size + position``)."""
        if not 0 <= position < self.text_len:
            raise IndexError(f"position must be in [0, {self.text_len}), got {position}")
        return self.vocab_size + position

    def __repr__(self) -> str:
        return (f"TextTokenizer(vocab_size={self.vocab_size}, trained={self._tokenizer.get_vocab_size()}, "
                f"text_len={self.text_len}, bpe_dropout={self.config.bpe_dropout})")

    # --- encoding -------------------------------------------------------------------------

    def normalize(self, text: str) -> str:
        """The text as the tokenizer sees it, and as :meth:`decode` gives it back:
        NFKC, lower case, words separated by single spaces."""
        _check_text(text)
        words = self._tokenizer.pre_tokenizer.pre_tokenize_str(self._tokenizer.normalizer.normalize_str(text))
        return " ".join(word for word, _ in words)

    def tokenize(self, text: str) -> list[str]:
        """The BPE tokens of ``text`` as strings (no padding, no truncation), for inspection."""
        _check_text(text)
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def unknown_words(self, text: str) -> tuple[list[str], int]:
        """``(words the vocabulary cannot spell, number of words)`` of ``text``.

        A word is unknown when any of its characters becomes ``<unk>`` (a script or symbol
        the training captions never used, e.g. Chinese or Arabic for the shapes model);
        the model sees nothing of it.
        """
        _check_text(text)
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        spans: dict[int, list[int]] = {}
        unknown: set[int] = set()
        for token, word, (start, end) in zip(encoding.tokens, encoding.word_ids, encoding.offsets):
            if word is None:
                continue
            span = spans.setdefault(word, [start, end])
            span[0], span[1] = min(span[0], start), max(span[1], end)
            if token == UNK:
                unknown.add(word)
        return [text[spans[w][0]:spans[w][1]] for w in sorted(unknown)], len(spans)

    def known_words(self, limit: int = 10) -> list[str]:
        """Whole words of the vocabulary, in the order BPE learned them (most frequent first), for messages."""
        vocab = self._tokenizer.get_vocab()
        words = [t[: -len(EOW)] for t in sorted(vocab, key=vocab.get) if t.endswith(EOW)]
        words = [w for w in words if w.isalpha() and len(w) >= 3]
        # Drop word ends that are only pieces of longer words ("rcle" of "circle").
        whole = [w for w in words if not any(o != w and o.endswith(w) for o in words)]
        return whole[:limit]

    def encode(self, text: str, *, training: bool = False, seed: int | None = None) -> list[int]:
        """``text`` -> exactly ``text_len`` ids (BPE tokens, then the per-position padding ids).

        ``training=True`` applies BPE dropout; ``seed`` (used only then) makes it
        reproducible.  Truncation is silent here: use :meth:`encode_with_info` to see it.
        """
        return self.encode_with_info(text, training=training, seed=seed).ids

    def encode_with_info(self, text: str, training: bool = False, seed: int | None = None) -> EncodeResult:
        """Like :meth:`encode`, also returning how many tokens past ``text_len`` were cut off."""
        _check_text(text)
        if training and seed is not None:
            ids = self._seeded_bpe().encode(text, self.config.bpe_dropout, random.Random(seed))
        elif training:
            ids = self._dropout_tokenizer.encode(text, add_special_tokens=False).ids
        else:
            ids = self._encode_cached([text])[0]
        cut = max(len(ids) - self.text_len, 0)
        ids = list(ids[: self.text_len])
        return EncodeResult(ids + self._pad_row[len(ids):].tolist(), cut)

    def encode_batch(self, texts: Sequence[str], *, training: bool = False, seed: int | None = None) -> torch.Tensor:
        """Many captions -> ``LongTensor[len(texts), text_len]``; the fast path for training and data prep.

        The library encodes the batch on all cores (set ``RAYON_NUM_THREADS`` to limit
        them).  Captions longer than ``text_len`` tokens are truncated with a warning
        that counts them.  ``seed`` (used only with ``training=True``) makes the dropout
        reproducible: the same texts and seed give the same ids.
        """
        if isinstance(texts, (str, bytes)):
            raise TypeError("encode_batch takes a sequence of captions; use encode() for a single string")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"caption {i} is a {type(text).__name__}, not a str: {text!r:.80}")
        if training and seed is not None:
            bpe, rng = self._seeded_bpe(), random.Random(seed)
            rows = [bpe.encode(text, self.config.bpe_dropout, rng) for text in texts]
        elif training:
            rows = [e.ids for e in self._dropout_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        else:
            rows = self._encode_cached(texts)
        return torch.from_numpy(self._pad_rows(rows))

    def _encode_cached(self, texts: list[str]) -> list[Sequence[int]]:
        """Dropout-free BPE ids of each text (untruncated), through the caption cache."""
        cache = self._cache
        rows: list[Sequence[int] | None] = [cache.get(text) for text in texts]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            encodings = self._tokenizer.encode_batch_fast([texts[i] for i in missing], add_special_tokens=False)
            room = self.cache_size - len(cache)
            for i, encoding in zip(missing, encodings):
                rows[i] = ids = tuple(encoding.ids)
                if room > 0 and len(texts[i]) <= 256:  # a long text is rarely seen twice
                    cache[texts[i]] = ids
                    room -= 1
        return rows  # type: ignore[return-value]

    def clear_cache(self) -> None:
        """Forget the remembered encodings (they never go stale; this only frees memory)."""
        self._cache.clear()

    def _pad_rows(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Truncate and pad variable-length id lists into one ``[B, text_len]`` int64 array."""
        L = self.text_len
        out = np.tile(self._pad_row, (len(rows), 1))
        n_long = n_cut = 0
        for i, ids in enumerate(rows):
            n = len(ids)
            if n > L:
                n_long += 1
                n_cut += n - L
                ids, n = ids[:L], L
            out[i, :n] = ids
        if n_long:
            warnings.warn(
                f"{n_long} of {len(rows)} captions were longer than text_len={L} tokens and were truncated "
                f"({n_cut} tokens dropped); raise tokenizer.text_len or shorten the captions",
                stacklevel=3,
            )
        return out

    def _seeded_bpe(self) -> _PythonBPE:
        if self._python_bpe is None:
            self._python_bpe = _PythonBPE(self._tokenizer)
        return self._python_bpe

    # --- decoding -------------------------------------------------------------------------

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids -> normalised (lower-case) text.

        Padding ids are skipped wherever they are, and so are ``<unk>`` and ids the
        trained vocabulary does not use (below ``vocab_size`` but past the trained
        size, which an untrained model might sample).  Raises ``ValueError`` for ids
        outside ``[0, total_vocab)``.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one caption's ids (1-D), got shape {list(ids.shape)}; use decode_batch")
            ids = ids.tolist()
        return self._tokenizer.decode(self._bpe_ids(ids), skip_special_tokens=True)

    def decode_batch(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """``[B, L]`` ids -> ``B`` strings, as :meth:`decode` does for each row."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 2:
                raise ValueError(f"decode_batch takes ids of shape [B, L], got {list(ids.shape)}")
            ids = ids.tolist()
        return self._tokenizer.decode_batch([self._bpe_ids(row) for row in ids], skip_special_tokens=True)

    def _bpe_ids(self, ids: Iterable[int]) -> list[int]:
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError:
            raise TypeError("token ids must be integers") from None
        if ids and (min(ids) < 0 or max(ids) >= self.total_vocab):
            raise ValueError(f"token ids must lie in [0, {self.total_vocab}), got [{min(ids)}, {max(ids)}]")
        return [i for i in ids if i < self.vocab_size]


def _check_text(text: object) -> None:
    if not isinstance(text, str):
        raise TypeError(f"expected caption text (str), got {type(text).__name__}")


class _PythonBPE:
    """The trained BPE model applied in Python, with BPE dropout from a seeded generator.

    Used only for reproducible training-time encoding: the library's dropout cannot be
    seeded.  With dropout 0 it gives exactly the library's ids (tested): within each
    word, the lowest-ranked (earliest learned) applicable merge is applied first, the
    leftmost occurrence first.  With dropout ``p`` each candidate merge is skipped with
    probability ``p`` in favour of the next one, and a word stops merging when every
    candidate was skipped, as in the library and in Provilkov et al. (2020).
    """

    def __init__(self, tokenizer: Tokenizer):
        model = json.loads(tokenizer.to_str())["model"]
        self.vocab: dict[str, int] = model["vocab"]
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(model["merges"]):
            left, right = merge.split(" ") if isinstance(merge, str) else merge  # older files store "a b"
            self.ranks[(left, right)] = rank
        self.normalizer = tokenizer.normalizer
        self.pre_tokenizer = tokenizer.pre_tokenizer

    def encode(self, text: str, dropout: float, rng: random.Random) -> list[int]:
        ids: list[int] = []
        for word, _ in self.pre_tokenizer.pre_tokenize_str(self.normalizer.normalize_str(text)):
            ids.extend(self._encode_word(word, dropout, rng))
        return ids

    def _encode_word(self, word: str, dropout: float, rng: random.Random) -> list[int]:
        symbols = list(word)
        symbols[-1] += EOW
        ranks = self.ranks
        while len(symbols) > 1:
            candidates = sorted(
                (rank, i) for i, pair in enumerate(zip(symbols, symbols[1:])) if (rank := ranks.get(pair)) is not None
            )
            for _, i in candidates:
                if dropout == 0.0 or rng.random() >= dropout:
                    symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
                    break
            else:
                break  # no candidates, or every one was dropped
        vocab = self.vocab
        return [vocab.get(symbol, 0) for symbol in symbols]


def read_caption_file(path: str | Path) -> list[str]:
    """The captions of a text file, one a line (blank lines skipped, surrounding whitespace stripped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"caption file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"caption file {path} is not UTF-8 text ({e})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]
