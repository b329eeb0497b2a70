"""Iso-C (merging.spectral) against a NumPy transcription of the published algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asymvlm.errors import ConfigError
from asymvlm.merging.methods import merge_params
from asymvlm.merging.spectral import IsoC


def _iso_c_numpy(taus, non_matrix="mean"):
    """Marczak et al. 2025, Iso-C: M = sum_t tau_t; M = U S V^T; merged = mean(S) U V^T (2-D);
    other tensors: the mean (or the sum)."""
    out = {}
    for key in taus[0]:
        m = sum(np.asarray(t[key], dtype=np.float64) for t in taus)
        if m.ndim == 2:
            u, s, vh = np.linalg.svd(m, full_matrices=False)
            out[key] = s.mean() * u @ vh
        else:
            out[key] = m / len(taus) if non_matrix == "mean" else m
    return out


def _taus(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    shapes = {"w": (7, 5), "b": (5,), "w2": (4, 9)}
    return [{k: torch.randn(*s, generator=g, dtype=f64) for k, s in shapes.items()} for _ in range(n)]


@pytest.mark.parametrize("non_matrix", ["mean", "sum"])
def test_iso_c_matches_the_numpy_transcription(non_matrix):
    taus = _taus()
    base = {k: torch.zeros_like(v) for k, v in taus[0].items()}
    got = merge_params(base, taus, "iso_c", lam=0.7, non_matrix=non_matrix)
    ref = _iso_c_numpy([{k: v.numpy() for k, v in t.items()} for t in taus], non_matrix)
    for key, value in ref.items():
        np.testing.assert_allclose(got[key].numpy(), 0.7 * value, rtol=1e-12, atol=1e-12)


def test_iso_c_spectrum_is_flat_and_keeps_the_singular_vectors():
    taus = _taus(seed=1)
    out = IsoC()(taus).delta["w"]
    m = sum(t["w"] for t in taus)
    s_out = torch.linalg.svdvals(out)
    s_in = torch.linalg.svdvals(m)
    torch.testing.assert_close(s_out, torch.full_like(s_out, float(s_in.mean())), rtol=1e-12, atol=1e-12)
    # the same column space: projecting M onto out's left singular vectors loses nothing
    u = torch.linalg.svd(out, full_matrices=False).U
    torch.testing.assert_close(u @ (u.T @ m), m, rtol=1e-10, atol=1e-10)


def test_iso_c_options_are_checked():
    with pytest.raises(ConfigError, match="non_matrix"):
        IsoC(non_matrix="median")
    with pytest.raises(ConfigError):
        merge_params({"w": torch.zeros(2, 2)}, [{"w": torch.ones(2, 2)}], "iso_c", density=0.2)
