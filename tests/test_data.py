import hashlib

import numpy as np
import pytest
import torch

from smoe.data import quickdraw
from smoe.data.quickdraw import load_official, load_subset


def test_shipped_subset_is_the_documented_file():
    # sha256 of the image array contents, from smoe/data/quickdraw/README.md
    d = np.load(quickdraw.SUBSET_PATH, allow_pickle=False)
    digest = hashlib.sha256(np.ascontiguousarray(d["images"]).tobytes()).hexdigest()
    assert digest == "44debafaee5dd4c9774fee5a1ab1e763ac30f03d842759df433c9417888f98be"


def test_subset_splits_and_polarity():
    train, test = load_subset("train"), load_subset("test")
    assert len(train) == 19200 and len(test) == 1800
    assert torch.equal(test.labels.bincount(), torch.full((9,), 200))
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.float32
    inverted = load_subset("test", dark_on_white=True)
    torch.testing.assert_close(inverted.images, 1 - test.images)
    assert test.images.mean() < 0.5 < inverted.images.mean()  # white strokes on black by default


def test_balanced_subset():
    b = load_subset("train").balanced(100)
    assert torch.equal(b.labels.bincount(), torch.full((9,), 100))
    with pytest.raises(ValueError, match="'moon' has 800 images"):
        load_subset("train").balanced(900)


def test_load_subset_rejects_bad_split_and_file(tmp_path):
    with pytest.raises(ValueError, match="split must be"):
        load_subset("val")
    bad = tmp_path / "bad.npz"
    np.savez(
        bad,
        images=np.zeros((3, 28, 28), np.float32),
        labels=np.zeros(3),
        split=np.zeros(3),
        categories=np.array(["a"]),
    )
    with pytest.raises(ValueError, match="bad.npz: images must be uint8"):
        load_subset(path=bad)


def test_load_official_reads_google_format(tmp_path):
    sub = np.load(quickdraw.SUBSET_PATH)
    cats = ["cat", "apple"]
    for c in cats:
        label = list(sub["categories"]).index(c)
        rows = sub["images"][sub["labels"] == label][:50].reshape(-1, 784)
        np.save(tmp_path / f"full_numpy_bitmap_{c}.npy", rows)
    d = load_official(tmp_path, cats, per_category=30)
    assert len(d) == 60 and d.categories == cats
    assert torch.equal(d.labels, torch.tensor([0] * 30 + [1] * 30))


def test_load_official_names_the_bad_file(tmp_path):
    np.save(tmp_path / "full_numpy_bitmap_cat.npy", np.zeros((4, 100), np.uint8))
    with pytest.raises(ValueError, match=r"full_numpy_bitmap_cat.npy must be \[N, 784\]"):
        load_official(tmp_path, ["cat"])
    np.save(tmp_path / "full_numpy_bitmap_cat.npy", np.zeros((4, 784), np.float32))
    with pytest.raises(ValueError, match="must hold uint8"):
        load_official(tmp_path, ["cat"])
    (tmp_path / "full_numpy_bitmap_cat.npy").write_bytes(b"\x93NUMPY trunc")
    with pytest.raises(ValueError, match="not a readable .npy"):
        load_official(tmp_path, ["cat"])
    with pytest.raises(FileNotFoundError, match="full_numpy_bitmap_dog.npy"):
        load_official(tmp_path, ["dog"])


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(quickdraw, "OFFICIAL_URL", "http://127.0.0.1:9/{}.npy")  # nothing listens
    with pytest.raises(RuntimeError, match="could not download.*offline"):
        load_official(tmp_path, ["cat"], download=True)
    assert not list(tmp_path.iterdir())  # no partial file left behind
