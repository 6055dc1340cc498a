"""Character-level text data: Tiny Shakespeare shipped in the package, a character vocabulary,
the 90/10 split, fixed-context batches, and the word-swap attack of specs/momentum_smoe.md §8.1.

Attribution: "Tiny Shakespeare, from Andrej Karpathy's char-rnn
(https://github.com/karpathy/char-rnn)"; public-domain text. Provenance and checksum:
``smoe/data/tinyshakespeare/README.md``. Nothing is downloaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "SHAKESPEARE_PATH",
    "CharCorpus",
    "CharVocab",
    "eval_windows",
    "load_text",
    "random_batch",
    "stream_batch",
    "tiny_shakespeare",
    "word_swap",
]

SHAKESPEARE_PATH = Path(__file__).with_name("tinyshakespeare") / "input.txt"


def load_text(path: str | os.PathLike | None = None) -> str:
    """The text of ``path`` (default: the shipped Tiny Shakespeare), read as UTF-8."""
    p = Path(path) if path is not None else SHAKESPEARE_PATH
    if not p.is_file():
        raise FileNotFoundError(f"load_text: no text file at {p}")
    return p.read_text(encoding="utf-8")


class CharVocab:
    """A character vocabulary: the sorted distinct characters of a text.

    Args:
        chars: the characters, in id order (no duplicates).
    """

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars) or not chars:
            raise ValueError("CharVocab: chars must be a non-empty string of distinct characters")
        self.chars = chars
        self._lut = np.full(max(map(ord, chars)) + 1, -1, dtype=np.int64)
        self._lut[[ord(c) for c in chars]] = np.arange(len(chars))

    @classmethod
    def from_text(cls, text: str, extra: str = "") -> CharVocab:
        """The vocabulary of ``text`` plus the characters of ``extra`` (e.g. a placeholder)."""
        return cls("".join(sorted(set(text) | set(extra))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """``[len(text)]`` int64 ids. Raises ValueError naming a character not in the vocabulary."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.where(codes < len(self._lut), self._lut[np.minimum(codes, len(self._lut) - 1)], -1)
        if (ids < 0).any():
            bad = text[int(np.argmax(ids < 0))]
            raise ValueError(f"CharVocab.encode: character {bad!r} is not in the vocabulary")
        return torch.from_numpy(ids)

    def decode(self, ids: Tensor) -> str:
        """The text of ``ids`` (any shape, flattened)."""
        return "".join(self.chars[i] for i in ids.reshape(-1).tolist())


@dataclass
class CharCorpus:
    """A character corpus split into ``train`` and ``val`` int64 id streams.

    Fields:
        train, val: ``[N]`` int64 character ids.
        vocab: the shared :class:`CharVocab`.
        val_text: the validation text (to attack with :func:`word_swap`).
    """

    train: Tensor
    val: Tensor
    vocab: CharVocab
    val_text: str


def tiny_shakespeare(
    *,
    val_fraction: float = 0.1,
    path: str | os.PathLike | None = None,
    placeholder: str = "AAA",
) -> CharCorpus:
    """Tiny Shakespeare, first ``1 - val_fraction`` of the characters for training, the rest for
    validation (nanoGPT's 90/10 convention). The vocabulary holds the text's characters plus those
    of the word-swap ``placeholder``, so clean and attacked text share it (specs/momentum_smoe.md
    §8.1)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"tiny_shakespeare: val_fraction must be in (0, 1), got {val_fraction}")
    text = load_text(path)
    vocab = CharVocab.from_text(text, extra=placeholder)
    cut = int(len(text) * (1.0 - val_fraction))
    return CharCorpus(vocab.encode(text[:cut]), vocab.encode(text[cut:]), vocab, text[cut:])


def random_batch(
    data: Tensor, batch_size: int, context: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``batch_size`` random windows of ``context + 1`` characters: inputs ``[B, S]`` and the
    next-character targets ``[B, S]``."""
    if data.numel() <= context:
        raise ValueError(f"random_batch: need more than context={context} ids, got {data.numel()}")
    start = torch.randint(0, data.numel() - context, (batch_size,), generator=generator)
    idx = start.unsqueeze(1) + torch.arange(context + 1)
    win = data[idx]
    return win[:, :-1], win[:, 1:]


def stream_batch(data: Tensor, batch_size: int, context: int, step: int) -> tuple[Tensor, Tensor]:
    """Transformer-XL training batches: ``data`` cut into ``batch_size`` contiguous streams;
    batch ``step`` holds the ``step``-th window of ``context`` characters of every stream, so row
    r of batch t + 1 continues row r of batch t (cycling back to the start of the streams)."""
    n = (data.numel() - 1) // batch_size  # characters per stream
    per = n // context  # windows per stream
    if per < 1:
        raise ValueError(
            f"stream_batch: need at least batch_size * context + 1 = "
            f"{batch_size * context + 1} ids, got {data.numel()}"
        )
    start = torch.arange(batch_size) * n + (step % per) * context
    idx = start.unsqueeze(1) + torch.arange(context + 1)
    win = data[idx]
    return win[:, :-1], win[:, 1:]


def eval_windows(
    data: Tensor,
    batch_size: int,
    context: int,
    *,
    max_batches: int | None = None,
    stream: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive non-overlapping windows from the start of ``data``, in batches (the same every
    call): inputs ``[B, S]`` and targets ``[B, S]``. A final partial batch is dropped.

    ``stream=False``: batch b holds windows bB … bB + B − 1. ``stream=True`` (for models with a
    memory across batches): the same windows, arranged so that row r of batch b + 1 continues row
    r of batch b (row r holds windows r·nb … r·nb + nb − 1 of the nb batches)."""
    n = (data.numel() - 1) // context
    windows = data[: n * context + 1]
    x = windows[:-1].reshape(n, context)
    y = windows[1:].reshape(n, context)
    batches = n // batch_size
    if max_batches is not None:
        batches = min(batches, max_batches)
    for b in range(batches):
        if stream:
            sl = torch.arange(batch_size) * batches + b
        else:
            sl = slice(b * batch_size, (b + 1) * batch_size)
        yield x[sl], y[sl]


_WHITESPACE = re.compile(r"(\s+)")


def word_swap(text: str, rate: float = 0.04, placeholder: str = "AAA", seed: int = 0) -> str:
    """The attacked-text protocol of specs/momentum_smoe.md §8.1, on any line-based text.

    Every whitespace-separated word is replaced independently with probability ``rate`` by
    ``placeholder``; whitespace (so every line break) is kept exactly. Random, not adversarial: no
    model is queried. Record ``rate`` and ``placeholder`` with every result (both are provisional
    in the spec).

    Args:
        text: the clean text.
        rate: replacement probability per word, in [0, 1]; 0 returns the text unchanged.
        placeholder: the replacement, a non-empty string without whitespace.
        seed: the same seed gives the same text (numpy's PCG64).

    Raises:
        ValueError: ``rate`` outside [0, 1], or a bad placeholder.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"word_swap: rate must be in [0, 1], got {rate}")
    if not placeholder or any(c.isspace() for c in placeholder):
        raise ValueError(
            f"word_swap: placeholder must be non-empty without whitespace, got {placeholder!r}"
        )
    parts = _WHITESPACE.split(text)
    # Words sit at the even positions of the split (possibly empty at the ends).
    words = parts[0::2]
    swap = np.random.default_rng(seed).random(len(words)) < rate
    for i in np.flatnonzero(swap):
        if words[i]:
            parts[2 * i] = placeholder
    return "".join(parts)
