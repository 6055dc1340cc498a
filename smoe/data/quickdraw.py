"""Quick, Draw! bitmaps (Google Creative Lab, CC BY 4.0): the subset shipped in this package, or
Google's official ``full_numpy_bitmap_<category>.npy`` files from a directory.

Attribution: "QuickDraw subset: The Quick, Draw! Dataset, Google Creative Lab, CC BY 4.0
(https://github.com/googlecreativelab/quickdraw-dataset); subset selected and repacked, pixels
unmodified." See ``smoe/data/quickdraw/README.md`` for provenance.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SUBSET_PATH = Path(__file__).with_name("quickdraw") / "quickdraw_subset.npz"
OFFICIAL_URL = "https://storage.googleapis.com/quickdraw_dataset/full/numpy_bitmap/{}.npy"


@dataclass
class QuickDraw:
    """Images as float32 ``[N, 1, 28, 28]`` in [0, 1], labels int64 ``[N]``, category names."""

    images: Tensor
    labels: Tensor
    categories: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    def balanced(self, per_class: int, *, seed: int = 0) -> QuickDraw:
        """A class-balanced subset with ``per_class`` images of every category (random, seeded)."""
        g = torch.Generator().manual_seed(seed)
        picks = []
        for c in range(len(self.categories)):
            idx = (self.labels == c).nonzero().flatten()
            if idx.numel() < per_class:
                raise ValueError(
                    f"balanced: category {self.categories[c]!r} has {idx.numel()} images, "
                    f"fewer than per_class={per_class}"
                )
            picks.append(idx[torch.randperm(idx.numel(), generator=g)[:per_class]])
        sel = torch.cat(picks)
        return QuickDraw(self.images[sel], self.labels[sel], self.categories)


def _to_float(images: np.ndarray, dark_on_white: bool) -> Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).reshape(-1, 1, 28, 28)
    return 1.0 - x if dark_on_white else x


def load_subset(
    split: str = "train", *, path: str | os.PathLike | None = None, dark_on_white: bool = False
) -> QuickDraw:
    """The shipped 9-category subset (21000 images; test = last 200 per class).

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.
        path: another ``.npz`` in the same format (default: the shipped file).
        dark_on_white: invert to dark strokes on white (the SMoE-VAE paper's polarity); Google's
            bitmaps are white strokes on black.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"load_subset: split must be 'train', 'test' or 'all', got {split!r}")
    path = Path(path) if path is not None else SUBSET_PATH
    try:
        d = np.load(path, allow_pickle=False)
        images, labels, split_arr = d["images"], d["labels"], d["split"]
        categories = [str(c) for c in d["categories"]]
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"load_subset: {path} is not a QuickDraw subset .npz ({e})") from e
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
        raise ValueError(
            f"load_subset: {path}: images must be uint8 [N, 28, 28], "
            f"got {images.dtype} {images.shape}"
        )
    keep = np.ones(len(labels), bool) if split == "all" else split_arr == (split == "test")
    return QuickDraw(
        _to_float(images[keep], dark_on_white), torch.from_numpy(labels[keep]).long(), categories
    )


def load_official(
    root: str | os.PathLike,
    categories: list[str],
    *,
    per_category: int | None = None,
    download: bool = False,
    dark_on_white: bool = False,
) -> QuickDraw:
    """Google's ``full_numpy_bitmap_<category>.npy`` (or ``<category>.npy``) files from ``root``.

    Args:
        root: directory holding the files (created when downloading).
        categories: category names, e.g. ``["cat", "apple"]``; labels follow this order.
        per_category: keep the first N rows of each file (None: all).
        download: fetch missing files from Google's public bucket (needs network).
        dark_on_white: see :func:`load_subset`.
    """
    root = Path(root)
    images, labels = [], []
    for label, cat in enumerate(categories):
        path = _find_file(root, cat)
        if path is None:
            if not download:
                raise FileNotFoundError(
                    f"load_official: no full_numpy_bitmap_{cat}.npy or {cat}.npy in {root}; pass "
                    "download=True or use load_subset() for the shipped data"
                )
            path = _download(cat, root)
        arr = _read_bitmaps(path, per_category)
        images.append(arr)
        labels.append(np.full(len(arr), label, dtype=np.int64))
    return QuickDraw(
        _to_float(np.concatenate(images), dark_on_white),
        torch.from_numpy(np.concatenate(labels)),
        list(categories),
    )


def _find_file(root: Path, cat: str) -> Path | None:
    for name in (f"full_numpy_bitmap_{cat}.npy", f"{cat}.npy"):
        if (root / name).exists():
            return root / name
    return None


def _read_bitmaps(path: Path, limit: int | None) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"load_official: {path} is not a readable .npy file (truncated?): {e}"
        ) from e
    if arr.dtype != np.uint8:
        raise ValueError(f"load_official: {path} must hold uint8 bitmaps, got {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != 784:
        raise ValueError(f"load_official: {path} must be [N, 784] (28x28 bitmaps), got {arr.shape}")
    return np.asarray(arr[:limit] if limit else arr).reshape(-1, 28, 28)


def _download(cat: str, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    dest = root / f"full_numpy_bitmap_{cat}.npy"
    url = OFFICIAL_URL.format(urllib.request.quote(cat))
    tmp = dest.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"load_official: could not download {url} ({e}); are you offline? The shipped subset "
            "is available through load_subset()"
        ) from e
    tmp.rename(dest)
    return dest
