"""smoe.data.text: the shipped Tiny Shakespeare, CharVocab, batches and the word-swap attack."""

from __future__ import annotations

import hashlib
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import smoe.data
from smoe.data import text as T

SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
# Words and separators, with several kinds of whitespace (tabs, CR, a non-breaking space).
TEXTS = st.text(alphabet=st.sampled_from("ab Z.,'\n\t\r\u00a0 "), max_size=80)


@pytest.fixture(scope="module")
def corpus():
    return T.tiny_shakespeare()


def _split(text):
    """Words (even positions) and whitespace runs (odd positions) of ``text``."""
    parts = re.split(r"(\s+)", text)
    return parts[0::2], parts[1::2]


# --- the shipped file -------------------------------------------------------------------------
def test_shakespeare_file_sha256():
    assert hashlib.sha256(T.SHAKESPEARE_PATH.read_bytes()).hexdigest() == SHA256
    assert T.load_text() == T.SHAKESPEARE_PATH.read_text(encoding="utf-8")


def test_load_text_reads_other_file_and_rejects_missing(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("héllo\n", encoding="utf-8")
    assert T.load_text(path) == "héllo\n"
    with pytest.raises(FileNotFoundError, match="no text file at"):
        T.load_text(tmp_path / "missing.txt")


# --- vocabulary and split ---------------------------------------------------------------------
def test_tiny_shakespeare_vocab_is_65_chars_plus_placeholder(corpus):
    text = T.load_text()
    assert len(set(text)) == 65
    assert corpus.vocab.chars == "".join(sorted(set(text)))  # "AAA" is already in the text
    assert len(corpus.vocab) == 65
    extra = T.tiny_shakespeare(placeholder="#@").vocab
    assert "#" not in text and "@" not in text
    assert extra.chars == "".join(sorted(set(text) | {"#", "@"})) and len(extra) == 67


def test_tiny_shakespeare_split_is_90_10(corpus):
    text = T.load_text()
    cut = math.floor(len(text) * 0.9)
    assert corpus.train.numel() == cut and corpus.val.numel() == len(text) - cut
    assert corpus.train.dtype == corpus.val.dtype == torch.int64
    assert corpus.val_text == text[cut:]
    assert corpus.vocab.decode(corpus.train) + corpus.vocab.decode(corpus.val) == text
    assert T.tiny_shakespeare(val_fraction=0.5).val.numel() == len(text) - len(text) // 2


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_tiny_shakespeare_rejects_bad_val_fraction(fraction):
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        T.tiny_shakespeare(val_fraction=fraction)


@SETTINGS
@given(st.text(alphabet=st.sampled_from("xyz é\n€"), max_size=40))
def test_char_vocab_round_trip(text):
    vocab = T.CharVocab("xyz é\n€")
    ids = vocab.encode(text)
    assert ids.dtype == torch.int64 and ids.shape == (len(text),)
    assert ids.tolist() == ["xyz é\n€".index(c) for c in text]
    assert vocab.decode(ids) == text
    assert vocab.decode(ids.reshape(1, -1)) == text


@pytest.mark.parametrize("bad", ["q", "\u20ac", "\U0001f600", "\x00"])
def test_char_vocab_encode_unknown_char_raises_naming_it(bad):
    vocab = T.CharVocab("abc")
    with pytest.raises(ValueError, match=re.escape(f"character {bad!r} is not in the vocabulary")):
        vocab.encode("ab" + bad + "c")


@pytest.mark.parametrize("chars", ["", "aba"])
def test_char_vocab_rejects_empty_or_duplicate_chars(chars):
    with pytest.raises(ValueError, match="non-empty string of distinct characters"):
        T.CharVocab(chars)


# --- batches ----------------------------------------------------------------------------------
def test_random_batch_shapes_and_shifted_targets(corpus):
    data = torch.arange(100)
    x, y = T.random_batch(data, 6, 10, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (6, 10)
    assert torch.equal(y, x + 1)  # ids equal positions: targets are the next character
    assert torch.equal(x - x[:, :1], torch.arange(10).expand(6, 10))  # contiguous windows
    assert int(x.min()) >= 0 and int(y.max()) <= 99
    x, y = T.random_batch(corpus.train, 4, 32, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_random_batch_rejects_short_data():
    with pytest.raises(ValueError, match="need more than context=5 ids, got 5"):
        T.random_batch(torch.arange(5), 2, 5, torch.Generator())


def test_eval_windows_fixed_and_non_overlapping():
    data = torch.arange(103)
    first = list(T.eval_windows(data, 3, 8))
    second = list(T.eval_windows(data, 3, 8))
    assert len(first) == (102 // 8) // 3 == 4  # 12 windows, in 4 full batches
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(first, second))
    x = torch.cat([b[0] for b in first])
    y = torch.cat([b[1] for b in first])
    assert x.shape == y.shape == (12, 8)
    assert torch.equal(x.reshape(-1), torch.arange(96))  # consecutive, no overlap, no gap
    assert torch.equal(y, x + 1)
    assert len(list(T.eval_windows(data, 3, 8, max_batches=2))) == 2
    assert len(list(T.eval_windows(data, 5, 8))) == 2  # the partial batch is dropped


# --- word swap --------------------------------------------------------------------------------
def test_word_swap_is_reexported():
    assert smoe.data.word_swap is T.word_swap


@SETTINGS
@given(TEXTS, st.integers(0, 2**32 - 1))
def test_word_swap_rate_zero_is_identity(text, seed):
    assert T.word_swap(text, rate=0.0, seed=seed) == text


@SETTINGS
@given(TEXTS, st.floats(0.0, 1.0), st.integers(0, 2**32 - 1), st.sampled_from(["AAA", "<unk>"]))
def test_word_swap_keeps_whitespace_and_lines(text, rate, seed, placeholder):
    out = T.word_swap(text, rate=rate, placeholder=placeholder, seed=seed)
    assert out.count("\n") == text.count("\n")
    assert len(out.splitlines()) == len(text.splitlines())
    words, spaces = _split(text)
    out_words, out_spaces = _split(out)
    assert out_spaces == spaces
    assert len(out_words) == len(words)
    assert all(o in (w, placeholder) for w, o in zip(words, out_words))
    assert all(o == "" for w, o in zip(words, out_words) if w == "")
    assert T.word_swap(text, rate=rate, placeholder=placeholder, seed=seed) == out


def test_word_swap_seeds_differ_on_long_text(corpus):
    a = T.word_swap(corpus.val_text, rate=0.04, seed=0)
    assert a == T.word_swap(corpus.val_text, rate=0.04, seed=0)
    assert a != T.word_swap(corpus.val_text, rate=0.04, seed=1)


@pytest.mark.parametrize("rate, seed", [(0.04, 0), (0.04, 7), (0.3, 3), (0.9, 11)])
def test_word_swap_replaced_share_is_rate(corpus, rate, seed):
    words = corpus.val_text.split()
    assert len(words) > 15_000 and "AAA" not in words
    out = T.word_swap(corpus.val_text, rate=rate, seed=seed).split()
    assert len(out) == len(words)
    replaced = sum(o == "AAA" for o in out)
    assert all(o == w for o, w in zip(out, words) if o != "AAA")
    n = len(words)
    # 6 binomial standard deviations: a correct implementation fails with probability < 1e-8.
    assert abs(replaced / n - rate) <= 6 * math.sqrt(rate * (1 - rate) / n)


def test_word_swap_rate_one_replaces_every_word():
    text = "First Citizen:\nBefore we proceed,  any further,\n\n hear me speak.\n"
    out = T.word_swap(text, rate=1.0, placeholder="X")
    assert out == "X X\nX X X  X X\n\n X X X\n"
    assert set(out.split()) == {"X"} and len(out.split()) == len(text.split())


@pytest.mark.parametrize("rate", [-0.01, 1.01, float("nan")])
def test_word_swap_rejects_rate_outside_unit_interval(rate):
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\]"):
        T.word_swap("a b", rate=rate)


@pytest.mark.parametrize("placeholder", ["", "A A", "A\n", "\tA", "A\u00a0"])
def test_word_swap_rejects_bad_placeholder(placeholder):
    with pytest.raises(ValueError, match="placeholder must be non-empty without whitespace"):
        T.word_swap("a b", placeholder=placeholder)
