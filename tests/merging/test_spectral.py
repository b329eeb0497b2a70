"""Iso-C (merging.spectral) against a NumPy transcription of the published algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asymvlm.errors import ConfigError
from asymvlm.merging.methods import merge_params
from asymvlm.merging.spectral import IsoC, IsoCTS, TsvM
from asymvlm.merging.task_vectors import MergeInputError


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


def _polar_np(m):
    p, _, qh = np.linalg.svd(m, full_matrices=False)
    return p @ qh


def _tsv_m_numpy(taus):
    """Gargiulo et al. 2025, TSV-M as the authors' code lays it out: per task the top int(r/T)
    triplets written into zero buffers of the full thin-SVD shape, the buffers orthogonalised by
    their polar factors, merged = polar(U) diag(S) polar(V); other tensors averaged."""
    t = len(taus)
    out = {}
    for key in taus[0]:
        mats = [np.asarray(x[key], dtype=np.float64) for x in taus]
        if mats[0].ndim != 2:
            out[key] = sum(mats) / t
            continue
        r = min(mats[0].shape)
        k = int(r * (1 / t))
        su, ss, sv = np.zeros((mats[0].shape[0], r)), np.zeros(r), np.zeros((r, mats[0].shape[1]))
        for i, m in enumerate(mats):
            u, s, vh = np.linalg.svd(m, full_matrices=False)
            su[:, i * k : (i + 1) * k], ss[i * k : (i + 1) * k], sv[i * k : (i + 1) * k] = u[:, :k], s[:k], vh[:k]
        out[key] = _polar_np(su) @ np.diag(ss) @ _polar_np(sv)
    return out


def _iso_cts_numpy(taus, common=0.8):
    """Marczak et al. 2025, Iso-CTS (Algorithm 2, the authors' rounding of the subspace sizes)."""
    t = len(taus)
    out = {}
    for key in taus[0]:
        mats = [np.asarray(x[key], dtype=np.float64) for x in taus]
        if mats[0].ndim != 2:
            out[key] = sum(mats) / t
            continue
        r = min(mats[0].shape)
        k = int(r * common)
        k = r - round((r - k) / t) * t
        per = int((r - k) / t)
        u, s, vh = np.linalg.svd(sum(mats), full_matrices=False)
        us, ss, vs = [], [], []
        for m in mats:
            off = m - u[:, :k] @ u[:, :k].T @ m
            ut, st, vt = np.linalg.svd(off, full_matrices=False)
            us.append(ut[:, :per]), ss.append(st[:per]), vs.append(vt[:per])
        u_all = np.concatenate(us + [u[:, :k]], 1)
        s_all = np.concatenate(ss + [s[:k]])
        v_all = np.concatenate(vs + [vh[:k]], 0)
        out[key] = s_all.mean() * _polar_np(u_all) @ _polar_np(v_all)
    return out


def _big_taus(n, seed, shapes):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in shapes.items()} for _ in range(n)]


@pytest.mark.parametrize("tasks", [2, 3, 8])
def test_tsv_m_matches_the_numpy_transcription(tasks):
    taus = _big_taus(tasks, tasks, {"w": (24, 17), "v": (9, 30), "b": (17,)})
    base = {k: torch.zeros_like(v) for k, v in taus[0].items()}
    got = merge_params(base, taus, "tsv_m", lam=0.6)
    ref = _tsv_m_numpy([{k: v.numpy() for k, v in t.items()} for t in taus])
    for key, value in ref.items():
        np.testing.assert_allclose(got[key].numpy(), 0.6 * value, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("tasks", "common"), [(2, 0.8), (3, 0.8), (8, 0.8), (3, 0.5), (4, 0.0)])
def test_iso_cts_matches_the_numpy_transcription(tasks, common):
    taus = _big_taus(tasks, 10 + tasks, {"w": (24, 17), "v": (9, 30), "b": (17,)})
    base = {k: torch.zeros_like(v) for k, v in taus[0].items()}
    got = merge_params(base, taus, "iso_cts", lam=1.3, common=common)
    ref = _iso_cts_numpy([{k: v.numpy() for k, v in t.items()} for t in taus], common)
    for key, value in ref.items():
        np.testing.assert_allclose(got[key].numpy(), 1.3 * value, rtol=1e-10, atol=1e-10)


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    taus = _big_taus(3, 4, {"w": (12, 10)})
    torch.testing.assert_close(IsoCTS(common=1.0)(taus).delta["w"], IsoC()(taus).delta["w"], rtol=1e-12, atol=1e-12)


def test_tsv_m_of_orthogonal_tasks_is_task_arithmetic():
    """Tasks on mutually orthogonal subspaces do not interfere: the polar factors change nothing and
    TSV-M keeps each task's whole (low-rank) matrix, i.e. their sum."""
    g = torch.Generator().manual_seed(3)
    q_left = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64)).Q
    q_right = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64)).Q
    taus = []
    for t in range(4):  # rank 3 each, in disjoint column blocks: 3 = int(12 / 4) triplets kept
        s = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64) * (t + 1))
        taus.append({"w": q_left[:, 3 * t : 3 * t + 3] @ s @ q_right[:, 3 * t : 3 * t + 3].T})
    got = TsvM()(taus).delta["w"]
    torch.testing.assert_close(got, sum(t["w"] for t in taus), rtol=1e-10, atol=1e-10)


def test_tsv_m_keeps_the_tasks_singular_values():
    taus = _big_taus(4, 5, {"w": (20, 20)})
    got = torch.linalg.svdvals(TsvM()(taus).delta["w"])
    kept = torch.cat([torch.linalg.svdvals(t["w"])[:5] for t in taus])
    torch.testing.assert_close(got, kept.sort(descending=True).values, rtol=1e-10, atol=1e-10)


def test_spectral_weights_scale_the_task_matrices():
    taus = _big_taus(3, 6, {"w": (10, 8), "b": (8,)})
    w = [0.5, 2.0, 1.0]
    scaled = [{k: v * wk for k, v in t.items()} for t, wk in zip(taus, w)]
    for agg in (IsoC(), IsoCTS(), TsvM()):
        got = agg(taus, w).delta
        ref = agg(scaled).delta
        torch.testing.assert_close(got["w"], ref["w"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got["b"], sum(scaled_t["b"] for scaled_t in scaled) / sum(w))


def test_spectral_options_are_checked():
    with pytest.raises(ConfigError, match="common"):
        IsoCTS(common=1.5)
    with pytest.raises(ConfigError, match="fraction"):
        TsvM(fraction=-0.1)
    with pytest.raises(ConfigError, match="at most 1/T"):
        TsvM(fraction=0.5)(_big_taus(3, 0, {"w": (6, 6)}))
    with pytest.raises(ConfigError, match="non_matrix"):
        TsvM(non_matrix="median")
    with pytest.raises(ConfigError):
        merge_params({"w": torch.zeros(2, 2)}, [{"w": torch.ones(2, 2)}], "tsv_m", common=0.5)
    with pytest.raises(MergeInputError, match="not finite"):
        IsoCTS()([{"w": torch.full((3, 3), float("nan"))}])


def test_a_failed_float32_svd_is_redone_in_float64(monkeypatch):
    """LAPACK's float32 SVD can fail to converge on a finite matrix (measured on head task vectors):
    the spectral merges then decompose it in float64 and give the same merge as a working float32 SVD."""
    import asymvlm.merging.spectral as spectral

    taus = [{k: v.float() for k, v in t.items()} for t in _big_taus(3, 8, {"w": (12, 10)})]
    expected = {name: agg(taus).delta["w"] for name, agg in (("c", IsoC()), ("cts", IsoCTS()), ("tsv", TsvM()))}
    real = torch.linalg.svd
    calls = {"float32": 0, "float64": 0}

    def flaky(m, full_matrices=True):
        calls[str(m.dtype).removeprefix("torch.")] += 1
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(m, full_matrices=full_matrices)

    monkeypatch.setattr(spectral.torch.linalg, "svd", flaky)
    for name, agg in (("c", IsoC()), ("cts", IsoCTS()), ("tsv", TsvM())):
        got = agg(taus).delta["w"]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected[name], rtol=1e-4, atol=1e-5)
    assert calls["float32"] > 0 and calls["float64"] == calls["float32"]
    nan_svd = lambda m, full_matrices=True: (m, torch.full(m.shape[-1:], float("nan")), m)  # noqa: E731
    monkeypatch.setattr(spectral.torch.linalg, "svd", nan_svd)
    with pytest.raises(torch.linalg.LinAlgError, match="non-finite"):
        spectral.svd(torch.eye(2, dtype=torch.float64))
