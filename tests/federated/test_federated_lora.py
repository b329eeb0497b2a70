"""asymvlm.federated.core.lora: every aggregation mode against the dense Delta W = sum_k p_k s B_k A_k oracle."""

import pytest
import torch

from asymvlm.federated.core.lora import LORA_MODES, aggregate_lora
from asymvlm.lora import dense_delta, join_peft_state, split_peft_state


def client_factors(k=4, r=3, d_in=12, d_out=10, seed=0, same_a=False, ranks=None):
    g = torch.Generator().manual_seed(seed)
    ranks = ranks or [r] * k
    a0 = torch.randn(ranks[0], d_in, generator=g)
    A = [a0.clone() if same_a else torch.randn(rk, d_in, generator=g) for rk in ranks]
    B = [torch.randn(d_out, rk, generator=g) for rk in ranks]
    return A, B


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("mode", ["frozen_a", "stack", "residual", "svd"])
def test_exact_modes_match_the_dense_oracle(mode):
    A, B = client_factors(same_a=(mode == "frozen_a"))
    w = [5.0, 1.0, 2.0, 2.0]
    p = [x / sum(w) for x in w]
    oracle = dense_delta(A, B, p, 2.0)
    # svd with rank = sum of client ranks reproduces Delta W exactly
    out = aggregate_lora(
        {"q": (A, B), "v": (A[::-1], B[::-1])}, w, mode=mode, scaling=2.0, rank=12 if mode == "svd" else None
    )
    assert rel(out.effective_delta("q"), oracle) < 1e-5
    assert rel(out.effective_delta("v"), dense_delta(A[::-1], B[::-1], p, 2.0)) < 1e-5


def test_factors_is_the_inexact_baseline_and_reports_its_error():
    A, B = client_factors()
    out = aggregate_lora({"q": (A, B)}, None, mode="factors", scaling=2.0)
    oracle = dense_delta(A, B, [0.25] * 4, 2.0)
    err = rel(out.effective_delta("q"), oracle)
    assert err > 0.1 and out.info["q"]["relative_error"] == pytest.approx(err, rel=1e-4)
    same = aggregate_lora({"q": ([A[0]] * 3, [B[0]] * 3)}, None, mode="factors", scaling=2.0)  # identical clients
    assert rel(same.effective_delta("q"), 2.0 * B[0] @ A[0]) < 1e-6


def test_svd_is_optimal_at_rank_r_and_handles_heterogeneous_ranks():
    A, B = client_factors(ranks=[2, 4, 3, 1])
    p = [0.25] * 4
    oracle = dense_delta(A, B, p, [1.0, 0.5, 2.0, 1.0])
    out = aggregate_lora({"q": (A, B)}, None, mode="svd", scaling=[1.0, 0.5, 2.0, 1.0], rank=3, new_scaling=2.0)
    a, b = out.adapters["q"]
    assert a.shape == (3, 12) and b.shape == (10, 3) and out.scaling == 2.0
    sv = torch.linalg.svdvals(oracle.double())
    best = float(sv[3:].pow(2).sum().sqrt() / sv.pow(2).sum().sqrt())  # Eckart-Young bound
    assert rel(out.effective_delta("q"), oracle) == pytest.approx(best, rel=1e-4)
    assert out.info["q"]["relative_error"] == pytest.approx(best, rel=1e-4)
    with pytest.raises(ValueError, match="same rank and scaling"):
        aggregate_lora({"q": (A, B)}, None, mode="residual")


def test_stack_reinitialises_the_adapter_and_folds_everything():
    A, B = client_factors(ranks=[2, 2, 5, 1])
    out = aggregate_lora({"q": (A, B)}, [1, 2, 3, 4], mode="stack", scaling=1.5, rank=4)
    a, b = out.adapters["q"]
    assert a.shape == (4, 12) and torch.count_nonzero(b) == 0  # fresh LoRA: B = 0
    assert rel(out.base_delta["q"], dense_delta(A, B, [0.1, 0.2, 0.3, 0.4], 1.5)) < 1e-6


def test_bad_inputs():
    A, B = client_factors(k=2)
    with pytest.raises(ValueError, match="unknown LoRA aggregation mode"):
        aggregate_lora({"q": (A, B)}, mode="average")
    with pytest.raises(ValueError, match="same frozen A"):
        aggregate_lora({"q": (A, B)}, mode="frozen_a")
    with pytest.raises(ValueError, match="do not form a LoRA pair"):
        aggregate_lora({"q": (A, [b.T for b in B])}, mode="residual")
    assert set(LORA_MODES) == {"factors", "frozen_a", "stack", "residual", "svd"}


def test_peft_state_dict_roundtrip():
    state = {
        "base_model.model.t.0.attn.lora_A.default.weight": torch.ones(2, 4),
        "base_model.model.t.0.attn.lora_B.default.weight": torch.zeros(3, 2),
    }
    layers = split_peft_state(state)
    assert set(layers) == {"base_model.model.t.0.attn"}
    back = join_peft_state({k: (v["A"], v["B"]) for k, v in layers.items()}, adapter="default")
    assert back.keys() == state.keys()
    with pytest.raises(ValueError, match="not a LoRA factor"):
        split_peft_state({"head.weight": torch.ones(1)})
