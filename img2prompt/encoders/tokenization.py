"""Fast, exact tokenization of prompts: open_clip's CLIP BPE and the MiniLM scorer's WordPiece.

CLIP (`FastClipTokenizer`) gives token for token what open_clip's `SimpleTokenizer(texts)` gives.
open_clip's `encode(text)` is: clean = `ftfy.fix_text` → `html.unescape` twice → strip → collapse
whitespace → `lower()`; words = `regex.findall(pat, clean)`; each word → UTF-8 bytes mapped through the
GPT-2 `bytes_to_unicode` table → BPE (the last symbol carries `</w>`) → ids. Why ours is the same:

1. Cleaning. For text of printable ASCII plus \\t \\n \\r (0x20-0x7E, 0x09, 0x0A, 0x0D) without '&',
   ftfy 6.x changes nothing but line breaks: its HTML unescaping needs '&'; terminal escapes need
   \\x1b; control-char removal only touches 0x00-0x08, 0x0B, 0x0E-0x1F, 0x7F; C1, ligatures, widths,
   curly quotes and surrogates are all non-ASCII; `fix_encoding` returns any text that is possible
   ASCII unchanged; NFC is the identity on ASCII; `fix_line_breaks` turns \\r\\n / \\r into \\n, which
   the whitespace collapse erases anyway. `html.unescape` is the identity without '&'. So there the
   clean text is `" ".join(text.split()).lower()`. Every other prompt goes through open_clip's own
   `_clean_lower` (tests/test_tokenization.py checks these claims against ftfy's own tables).
2. Chunks. No alternative of open_clip's pattern can match or cross a space, so findall over the
   clean text is the concatenation of findall over its space-separated chunks: every chunk is
   tokenized once and its ids are cached (real prompts reuse a few tens of thousands of chunks).
3. Words. A chunk of lower-case printable ASCII without "<start_of_text>"/"<end_of_text>" is split in
   Rust (`tokenizers` Split with the same pattern minus the special tokens; on such text IGNORECASE
   and the Unicode classes \\p{L}, \\p{N}, \\s reduce to plain ASCII classes, the same in onig and in
   `regex`). Any other chunk is split in Python by open_clip's own compiled pattern, and a word equal
   to a special token maps to its id, as open_clip's BPE cache does.
4. BPE. Rust BPE (vocab = open_clip's `encoder`, merges in `bpe_ranks` order, `end_of_word_suffix`
   "</w>", ByteLevel without regex = the same byte table) applies the lowest-ranked pair first, leftmost
   first; open_clip merges every occurrence of the lowest-ranked pair per round. These agree because
   in CLIP's merge list every merge's parts are produced only by lower-ranked merges, so a merge never
   creates a pair ranked below itself (checked in `_check_merge_order` on load).

MiniLM (`minilm_token_ids` / `pad_minilm_batch`): the Rust tokenizer from the model folder's
tokenizer.json — the very backend transformers wraps — with truncation to max_seq_length and padding
to the batch's longest row done as sentence-transformers' `preprocess` asks transformers to do it.
"""
from __future__ import annotations

import gzip
import re
import threading
from itertools import chain
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
# open_clip's word pattern without the special-token alternatives (chunks holding those never reach Rust)
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_OPEN_CLIP_PATTERN = "|".join(SPECIAL_TOKENS) + "|" + _WORD_PATTERN
_PRINTABLE_ASCII_WS = re.compile(r"[\t\n\r\x20-\x7e]*")  # stdlib re: ASCII-only semantics, no surprises
# Texts longer than this many characters per kept token are cut before tokenizing (see `_cut`): CLIP keeps
# 77 tokens, and a 12 MiB query text once kept the model worker busy for 149 s.
CUT_CHARS_PER_TOKEN = 32
_LAST_SPACE = re.compile(r"\s(?=\S*\Z)")


def fast_clean(text: str) -> str | None:
    """open_clip's `_clean_lower(text)` when that provably needs no ftfy/html work, else None."""
    if text.isascii() and "&" not in text and (text.isprintable() or _PRINTABLE_ASCII_WS.fullmatch(text)):
        return " ".join(text.split()).lower()
    return None


def _read_bpe(bpe_path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """open_clip's vocabulary and merge list, built exactly as SimpleTokenizer.__init__ builds them."""
    from open_clip.tokenizer import bytes_to_unicode

    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(merge.split()) for merge in merges[1:49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(merge) for merge in merges] + list(SPECIAL_TOKENS)
    return dict(zip(vocab, range(len(vocab)))), merges


def _check_merge_order(merges: list[tuple[str, str]]) -> None:
    """Greedy-by-rank (Rust) equals open_clip's rounds only if no merge's part is made by a later merge."""
    made_at: dict[str, int] = {}
    for rank, (first, second) in enumerate(merges):
        if made_at.setdefault(first + second, rank) != rank:
            raise ValueError(f"BPE merge {rank} makes {first + second!r} a second time")
    for rank, (first, second) in enumerate(merges):
        if made_at.get(first, -1) >= rank or made_at.get(second, -1) >= rank:
            raise ValueError(f"BPE merge {rank} {first!r}+{second!r} uses a token made by a later merge")


class _ClipBpeState:
    """Per-process, per-bpe-file tables: the Rust tokenizers and the chunk → ids cache (shared by instances)."""

    max_chunks = 500_000  # ~80 MB of cache; it is cleared when full (outputs never depend on it)

    def __init__(self, bpe_path: str):
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers

        vocab, merges = _read_bpe(bpe_path)
        _check_merge_order(merges)
        self.vocab = vocab
        self.merges = merges
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

        def bpe_tokenizer() -> Any:
            return Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), end_of_word_suffix="</w>"))

        # text chunks of plain ASCII: split in Rust by the same pattern (keep the matches, drop the rest)
        self.text_tokenizer = bpe_tokenizer()
        self.text_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="removed", invert=True), byte_level])
        # words already split by open_clip's own regex in Python: only the byte mapping + BPE
        self.word_tokenizer = bpe_tokenizer()
        self.word_tokenizer.pre_tokenizer = byte_level
        import regex
        from open_clip.tokenizer import _clean_lower

        self.slow_clean = _clean_lower  # open_clip's own cleaning (ftfy, html) for all other prompts
        self.pattern = regex.compile(_OPEN_CLIP_PATTERN, regex.IGNORECASE)
        self.special_ids = {token: vocab[token] for token in SPECIAL_TOKENS}
        self.lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.index: dict[str, int] = {}
        self.count = 0  # chunks in the cache
        self.used = 0  # ids in the pool
        self.starts = np.zeros(1024, dtype=np.int64)
        self.lengths = np.zeros(1024, dtype=np.int64)
        self.pool = np.zeros(16384, dtype=np.int64)

    def chunk_ids(self, chunks: list[str]) -> list[list[int]]:
        """Token ids of clean-text chunks (no spaces inside), computed without the cache."""
        simple, other = [], []
        for number, chunk in enumerate(chunks):
            plain = (chunk.isascii() and chunk.isprintable() and "<start_of_text>" not in chunk
                     and "<end_of_text>" not in chunk)
            (simple if plain else other).append(number)
        out: list[list[int]] = [[] for _ in chunks]
        if simple:
            encodings = self.text_tokenizer.encode_batch_fast([chunks[i] for i in simple],
                                                               add_special_tokens=False)
            for number, encoding in zip(simple, encodings):
                out[number] = encoding.ids
        for number in other:  # rare: non-ASCII or a literal special token: open_clip's own regex
            words = self.pattern.findall(chunks[number])
            if not any(word in self.special_ids for word in words):
                out[number] = self._bpe_words([words])[0] if words else []
                continue
            plain_words = [word for word in words if word not in self.special_ids]
            plain_ids = iter(self._bpe_words([[word] for word in plain_words]))
            out[number] = list(chain.from_iterable(
                [self.special_ids[word]] if word in self.special_ids else next(plain_ids) for word in words))
        return out

    def _bpe_words(self, word_lists: list[list[str]]) -> list[list[int]]:
        encodings = self.word_tokenizer.encode_batch_fast(word_lists, is_pretokenized=True,
                                                          add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def slots(self, chunks: list[str]) -> np.ndarray:
        """Cache slot of every chunk, tokenizing the unseen ones in one batch."""
        if self.count > self.max_chunks:
            self._reset()
        index = self.index
        try:
            return np.fromiter(map(index.__getitem__, chunks), dtype=np.int64, count=len(chunks))
        except KeyError:
            missing = list(dict.fromkeys(chunk for chunk in chunks if chunk not in index))
            self._add(missing, self.chunk_ids(missing))
            return np.fromiter(map(index.__getitem__, chunks), dtype=np.int64, count=len(chunks))

    def _add(self, chunks: list[str], ids: list[list[int]]) -> None:
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        first, last = self.count, self.count + len(chunks)
        if last > len(self.starts):
            size = max(last, 2 * len(self.starts))
            self.starts = np.resize(self.starts, size)
            self.lengths = np.resize(self.lengths, size)
        if self.used + len(flat) > len(self.pool):
            self.pool = np.resize(self.pool, max(self.used + len(flat), 2 * len(self.pool)))
        self.lengths[first:last] = lengths
        self.starts[first:last] = self.used + np.cumsum(lengths) - lengths
        self.pool[self.used:self.used + len(flat)] = flat
        self.used += len(flat)
        self.index.update(zip(chunks, range(first, last)))
        self.count = last


_STATES: dict[str, _ClipBpeState] = {}
_STATES_LOCK = threading.Lock()


def _state_for(bpe_path: str) -> _ClipBpeState:
    with _STATES_LOCK:
        state = _STATES.get(bpe_path)
        if state is None:
            state = _STATES[bpe_path] = _ClipBpeState(bpe_path)
        return state


def _default_bpe() -> str:
    from open_clip.tokenizer import default_bpe

    return str(default_bpe())


class FastClipTokenizer:
    """Drop-in for open_clip's default `SimpleTokenizer` (clean='lower'): the same tensors, several times
    faster with a cold chunk cache and ~15x once it is warm.

    Pickles as (bpe file path, context_length): a spawned worker rebuilds it in ~0.2 s, once per process.
    """

    def __init__(self, bpe_path: str | None = None, context_length: int | None = 77):
        self.bpe_path = str(bpe_path or _default_bpe())
        self.context_length = context_length
        self._state = _state_for(self.bpe_path)
        self.sot_token_id = self._state.special_ids["<start_of_text>"]
        self.eot_token_id = self._state.special_ids["<end_of_text>"]
        self.all_special_ids = [self.sot_token_id, self.eot_token_id]
        self.vocab_size = len(self._state.vocab)

    @classmethod
    def from_open_clip(cls, tokenizer: Any, bpe_path: str | None = None) -> "FastClipTokenizer":
        """The fast equivalent of `tokenizer`; ValueError when it is not a default-clean SimpleTokenizer
        whose vocabulary, merges and pattern are those of `bpe_path` (open_clip's default file)."""
        reason = unsupported_reason(tokenizer)
        if reason:
            raise ValueError(f"no fast equivalent of this tokenizer: {reason}")
        fast = cls(bpe_path, context_length=tokenizer.context_length)
        state = fast._state
        ranks = dict(zip(state.merges, range(len(state.merges))))
        if tokenizer.encoder != state.vocab or tokenizer.bpe_ranks != ranks:
            raise ValueError(f"the tokenizer's vocabulary or merges differ from {fast.bpe_path}")
        return fast

    def __reduce__(self):
        return (FastClipTokenizer, (self.bpe_path, self.context_length))

    def __repr__(self) -> str:
        return f"FastClipTokenizer(bpe_path={self.bpe_path!r}, context_length={self.context_length})"

    def _flat_ids(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids (open_clip `encode`) concatenated, and each text's count."""
        fullmatch, slow_clean = _PRINTABLE_ASCII_WS.fullmatch, self._state.slow_clean
        # The fast_clean condition, inlined (this line is most of the time per prompt). There the chunks
        # of " ".join(text.split()).lower() are text.lower().split(), but "" gives none instead of [""].
        split = [text.lower().split() if text.isascii() and "&" not in text
                 and (text.isprintable() or fullmatch(text)) else slow_clean(text).split(" ")
                 for text in texts]
        chunks_per_text = np.fromiter(map(len, split), dtype=np.int64, count=len(split))
        state = self._state
        with state.lock:
            slots = state.slots(list(chain.from_iterable(split)))
            lengths = state.lengths[slots]
            starts = state.starts[slots]
            total = int(lengths.sum())
            # gather the chunks' ids from the pool in order: id k of chunk c sits at starts[c] + k
            chunk_first = np.cumsum(lengths) - lengths
            ids = state.pool[np.repeat(starts - chunk_first, lengths) + np.arange(total)]
        ids_before_chunk = np.concatenate([[0], np.cumsum(lengths)])
        chunk_end = np.cumsum(chunks_per_text)
        counts = ids_before_chunk[chunk_end] - ids_before_chunk[chunk_end - chunks_per_text]
        return ids, counts

    def _cut(self, text: str, keep: int) -> str:
        """A prefix of `text` whose first `keep` ids are the text's own, or `text` when it is short.

        The prefix ends at a whitespace: for fast-path text (printable ASCII without '&', nearly every
        prompt) clean = lower + split, so the prefix's chunks are the text's first chunks and its ids are a
        prefix of the text's ids; it is taken once it has more than `keep` ids. The window grows ×4 until
        then, so a text of a million spaces still ends up tokenized whole, but only once. For other text
        (ftfy cleaning, or no whitespace in the window) the same rule is a close, not a proven, match.
        """
        window = keep * CUT_CHARS_PER_TOKEN
        while window < len(text):
            head = text[:window]
            space = _LAST_SPACE.search(head)
            if space and space.start() > 0:
                head = head[:space.start()]
            if int(self._flat_ids([head])[1][0]) > keep:
                return head
            window *= 4
        return text

    def cut(self, text: str) -> str:
        """`text`, or a prefix with the same CLIP tokens (see `_cut`): what to tokenize when only the
        context matters (e.g. whether a prompt is truncated)."""
        return self._cut(text, self.context_length or 77) if len(text) > 77 * CUT_CHARS_PER_TOKEN else text

    def encode(self, text: str) -> list[int]:
        """open_clip's `encode`: the text's BPE ids, without start/end tokens or truncation."""
        return self._flat_ids([text])[0].tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        ids, counts = self._flat_ids(texts)
        return [part.tolist() for part in np.split(ids, np.cumsum(counts)[:-1])] if len(texts) else []

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        """[n, context_length] int64: start, ids, end, zeros; too long → cut, last position = end."""
        if isinstance(texts, str):
            texts = [texts]
        context_length = context_length or self.context_length
        assert context_length, "Please set a valid context length"
        n = len(texts)
        limit = context_length * CUT_CHARS_PER_TOKEN
        texts = [self._cut(text, context_length) if len(text) > limit else text for text in texts]
        ids, counts = self._flat_ids(texts)
        out = np.zeros((n, context_length), dtype=np.int64)
        out[:, 0] = self.sot_token_id
        row = np.repeat(np.arange(n), counts)
        column = 1 + np.arange(len(ids)) - np.repeat(np.cumsum(counts) - counts, counts)
        keep = column <= context_length - 2  # room for the end token, as open_clip's cut-then-overwrite
        out[row[keep], column[keep]] = ids[keep]
        out[np.arange(n), np.minimum(counts + 1, context_length - 1)] = self.eot_token_id
        return torch.from_numpy(out)


def unsupported_reason(tokenizer: Any) -> str | None:
    """Why `tokenizer` has no exact fast equivalent here, or None when it has one."""
    from open_clip.tokenizer import SimpleTokenizer, _clean_lower, bytes_to_unicode

    if type(tokenizer) is not SimpleTokenizer:
        return f"{type(tokenizer).__name__} is not open_clip's SimpleTokenizer"
    if getattr(tokenizer, "clean_fn", None) is not _clean_lower:
        return "cleaning other than clean='lower'"
    if getattr(tokenizer, "reduction_fn", None) is not None:
        return "a reduction_mask is set"
    if tokenizer.all_special_ids != [tokenizer.encoder.get(t) for t in SPECIAL_TOKENS] or \
            len(tokenizer.all_special_ids) != 2:
        return "special tokens other than <start_of_text>/<end_of_text>"
    import regex

    if tokenizer.pat.pattern != _OPEN_CLIP_PATTERN or not tokenizer.pat.flags & regex.IGNORECASE:
        return "a different word pattern"
    if tokenizer.byte_encoder != bytes_to_unicode():
        return "a different byte table"
    return None


def make_clip_tokenizer(tokenizer: Any, bpe_path: str | None = None) -> Any:
    """FastClipTokenizer for open_clip's default SimpleTokenizer; any other tokenizer comes back unchanged."""
    if unsupported_reason(tokenizer):
        return tokenizer
    try:
        return FastClipTokenizer.from_open_clip(tokenizer, bpe_path)
    except (ValueError, OSError):
        return tokenizer


# ---------------------------------------------------------------------------------------------- MiniLM

def load_minilm_tokenizer(model_folder: str | Path) -> Any:
    """The scorer's Rust tokenizer (tokenizer.json), padding and truncation off (set per call).

    A `tokenizers.Tokenizer` pickles by value; a worker may as well call this with the folder path."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model_folder) / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def minilm_token_ids(tokenizer: Any, prompts: Sequence[str], max_seq_length: int) -> list[np.ndarray]:
    """Each prompt's ids with [CLS]/[SEP], cut to max_seq_length, unpadded (int32).

    sentence-transformers 6 calls the tokenizer with truncation="longest_first" and max_length =
    model_max_length (= max_seq_length); transformers hands that to the Rust tokenizer as below."""
    wanted = {"max_length": max_seq_length, "stride": 0, "strategy": "longest_first", "direction": "right"}
    if tokenizer.truncation != wanted:
        tokenizer.enable_truncation(**wanted)
    if tokenizer.padding is not None:
        tokenizer.no_padding()
    encodings = tokenizer.encode_batch_fast(list(prompts), add_special_tokens=True)
    return [np.array(encoding.ids, dtype=np.int32) for encoding in encodings]


def pad_minilm_batch(id_arrays: Sequence[np.ndarray], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """input_ids / token_type_ids / attention_mask as SentenceTransformer.preprocess gives them for
    these prompts: right-padded with [PAD] (id 0 in MiniLM's vocab) to the longest row, int64."""
    if not len(id_arrays):
        return {}
    lengths = np.fromiter(map(len, id_arrays), dtype=np.int64, count=len(id_arrays))
    width = int(lengths.max())
    mask = np.arange(width) < lengths[:, None]
    input_ids = np.full((len(id_arrays), width), pad_id, dtype=np.int64)
    input_ids[mask] = np.concatenate(id_arrays)
    return {"input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.zeros((len(id_arrays), width), dtype=torch.int64),  # one segment
            "attention_mask": torch.from_numpy(mask.astype(np.int64))}


def minilm_encode_features(st_model: Any, features: dict[str, torch.Tensor]) -> np.ndarray:
    """The model's normalised sentence embeddings (float32) for a padded batch, as `encode` computes them."""
    from sentence_transformers.util import batch_to_device

    with torch.inference_mode():
        features = batch_to_device({**features, "modality": "text"}, st_model.device)
        embeddings = st_model(features)["sentence_embedding"]
        embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=1)  # encode(normalize_embeddings=True)
        return embeddings.float().cpu().numpy()
