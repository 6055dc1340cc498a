"""The SMoE-VAE QuickDraw example script (smoe.examples.quickdraw_vae, specs/smoe_vae_quickdraw.md
§11.11): routing metrics, data loading and splitting, the one-epoch smoke test, the dataset study
and the CLI. The model itself is tests/test_vae.py's."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from smoe.examples import quickdraw_vae as qv
from smoe.models import SMoEVAE


def test_routing_stats():
    expert = torch.tensor([0, 0, 0, 1, 1, 2] + [3] * 10)
    labels = torch.tensor([0, 0, 1, 1, 1, 0] + [2] * 9 + [0])
    conf, active, purity = qv.routing_stats(expert, labels, num_experts=5, num_classes=3)
    assert conf.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 0], [1, 0, 9], [0, 0, 0]]
    assert active == 1  # only expert 3 has >= 10 images
    assert purity == pytest.approx((2 + 2 + 1 + 9) / 16)


def test_load_data_selects_and_relabels_subset_categories():
    cfg = qv.Config(categories=("eye", "apple"), train_per_class=50, test_per_class=20)
    train, test = qv.load_data(cfg)
    assert train.categories == ["eye", "apple"]
    assert train.labels.bincount().tolist() == [50, 50] and test.labels.bincount().tolist() == [
        20,
        20,
    ]
    assert train.images.mean() > 0.5  # dark on white by default (the paper's polarity)
    with pytest.raises(ValueError, match="snowflake"):
        qv.load_data(qv.Config(categories=("snowflake",)))


def test_load_data_splits_official_files_per_class(tmp_path):
    rows = {c: np.random.randint(0, 256, (15, 784), dtype=np.uint8) for c in ("a", "b")}
    for c, arr in rows.items():
        np.save(tmp_path / f"full_numpy_bitmap_{c}.npy", arr)
    cfg = qv.Config(
        full_dataset=str(tmp_path), categories=("b", "a"), train_per_class=10, test_per_class=4
    )
    train, test = qv.load_data(cfg)
    assert (
        train.labels.tolist() == [0] * 10 + [1] * 10 and test.labels.tolist() == [0] * 4 + [1] * 4
    )
    want = torch.from_numpy(rows["b"][10:14]).float().div(255).reshape(-1, 1, 28, 28)
    torch.testing.assert_close(test.images[:4], 1 - want)  # the rows after the training rows
    with pytest.raises(ValueError, match="'b' has 15 images"):
        qv.load_data(
            qv.Config(
                full_dataset=str(tmp_path), categories=("b",), train_per_class=14, test_per_class=4
            )
        )


def test_smoke_one_epoch_on_the_subset_reduces_the_loss():
    # §11.11: CPU, 1 epoch, E = 4
    cfg = qv.Config(train_per_class=80, test_per_class=20, device="cpu")
    train, test = qv.load_data(cfg)
    model = SMoEVAE(4)
    before = qv.evaluate(model, test).recon_error
    hist = qv.train_model(model, train, test, epochs=1, batch_size=32, progress=False)
    after = qv.evaluate(model, test).recon_error
    assert len(hist.step_loss) == math.ceil(480 / 32)
    assert sum(hist.step_loss[-3:]) < sum(hist.step_loss[:3])
    assert after < 0.8 * before
    assert hist.epoch_test_recon == [pytest.approx(after)]
    assert 0 <= hist.epoch_active[0] <= 4


def test_dataset_study_runs(tmp_path):
    cfg = qv.Config(
        train_per_class=20, test_per_class=10, epochs=1, out=str(tmp_path), progress=False
    )
    rows, path = qv.dataset_study(cfg, fractions=(0.5, 1.0), experts=(1, 2))
    assert [(r.fraction, r.model, r.num_experts) for r in rows] == [
        (f, m, e)
        for f in (0.5, 1.0)
        for m, e in (("unsupervised", 1), ("unsupervised", 2), ("supervised", 6))
    ]
    assert [r.train_images for r in rows[::3]] == [60, 120]
    assert all(math.isfinite(r.test_recon) for r in rows)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 0.5 | 60 | unsupervised | 1 |" in qv.format_study(rows)


def test_cli_runs_a_tiny_config(tmp_path, capsys):
    qv.main(
        [
            "--epochs",
            "1",
            "--experts",
            "3",
            "--train-per-class",
            "20",
            "--test-per-class",
            "12",
            "--tsne-points",
            "60",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--categories",
            "cat,eye,fish",
            "--device",
            "cpu",
        ]
    )
    printed = capsys.readouterr().out
    assert "| unsupervised | 3 |" in printed and "| supervised | 3 |" in printed
    summary = json.loads((tmp_path / "summary.json").read_text())
    for path in summary["figures"].values():
        assert path in printed
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for report in summary["models"].values():
        assert math.isfinite(report["test_recon"]) and 0 < report["purity"] <= 1
