"""The demo's newcomer tables and the federated plot: columns, the legend's chance levels (computed
from the data, not typed in), the chosen-hyperparameter rows."""

from __future__ import annotations

import math

import pytest
import torch


def _eval_data(n_img=50, seed=0):
    from asymvlm.eval.benchmark import EvalData

    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0, 1, 2] * n_img)
    owner = torch.arange(n_img).repeat_interleave(3)
    captions = [f"cap-{lv}-{i % 7 if lv < 2 else i}" for i, lv in zip(owner.tolist(), levels)]
    consistent = torch.rand(3 * n_img, n_img, generator=g) < 0.2
    consistent[torch.arange(3 * n_img), owner] = True
    return EvalData(
        image_embeddings=torch.nn.functional.normalize(torch.randn(n_img, 8, generator=g), dim=-1),
        text_embeddings=torch.nn.functional.normalize(torch.randn(3 * n_img, 8, generator=g), dim=-1),
        text_image_index=owner,
        levels=levels,
        consistent=consistent,
        captions=captions,
    )


def test_specific_table_columns_and_chance_levels():
    from asymvlm.eval.benchmark import specific_table

    data = _eval_data()
    report = {
        "clip": {"t2i_R@1_level2": 0.25, "i2t_R@1_level2": 0.5, "consistent_t2i_R@1": 0.75},
        "vmf": {"t2i_R@1_level2": 0.125, "uncertainty_ambiguity_spearman": 0.9, "bin_pearson": -0.8,
                "error_auroc": float("nan")},
    }  # fmt: skip
    text = specific_table(report, ["clip", "vmf"], data)
    lines = text.splitlines()
    header = ["model", "R@1", "L2", "i2t", "L2", "cons.", "R@1", "amb.", "rho", "bin", "r", "err", "AUROC"]
    assert lines[0].split() == header
    assert lines[1].split() == ["clip", "0.250", "0.500", "0.750", "-", "-", "-"]
    assert lines[2].split() == ["vmf", "0.125", "-", "-", "0.900", "-0.800", "-"]  # NaN prints as '-'
    legend = "\n".join(lines[3:])
    assert f"chance {1 / 50:.3f}" in legend  # 50 images
    assert f"among 50 distinct ones (chance {1 / 50:.4f})" in legend  # level-2 captions are all distinct
    assert f"chance {float(data.consistent.double().mean()):.3f}" in legend


def test_specific_table_needs_ground_truth():
    from asymvlm.eval.benchmark import specific_table

    data = _eval_data()
    data.consistent = None
    with pytest.raises(ValueError, match="ground truth"):
        specific_table({"clip": {}}, ["clip"], data)


def _rows():
    return [
        {"name": "centralized", "recipe": "fedavg", "setup": "centralized", "chosen": {},
         "grid": [{"options": {}, "val": 0.3}], "test_t2i_R@1_most_specific": 0.31,
         "test_uncertainty_ambiguity_spearman": 0.9},
        {"name": "fedadam", "recipe": "fedadam", "setup": "non-iid", "chosen": {"server_lr": 0.03, "server_tau": 0.001},
         "grid": [{"options": {"server_lr": 0.01, "server_tau": 0.001}, "val": 0.1},
                  {"options": {"server_lr": 0.03, "server_tau": 0.001}, "val": 0.2},
                  {"options": {"server_lr": 0.1, "server_tau": 0.001}, "val": -math.inf}],
         "test_t2i_R@1_most_specific": 0.19, "test_uncertainty_ambiguity_spearman": 0.8},
    ]  # fmt: skip


def test_federated_table_rows():
    from asymvlm.training.demo import federated_table

    lines = federated_table(_rows(), 5).splitlines()
    assert "reference (centralized)" in lines[1] and lines[1].split()[-3:] == ["0.300", "0.310", "0.900"]
    assert "lr 0.03, tau 0.001" in lines[2] and lines[2].split()[-4:] == ["3", "0.200", "0.190", "0.800"]
    assert "chance" in lines[-1]


def test_plot_federated_writes_a_png(tmp_path):
    from asymvlm.eval.plots import plot_federated

    path = plot_federated(_rows(), tmp_path / "federated.png", 5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
