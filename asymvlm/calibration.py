"""The calibrator: the parts of an answer's uncertainty -> the probability that the answer is right.

:class:`Calibrator` is logistic regression on the standardised parts (Platt 1999), one model per
stratum of the text's ambiguity, optionally followed by isotonic regression (Zadrozny & Elkan 2002),
with a gate on the unfamiliarity of the answers it was fitted on. It is fitted on a validation split
(:func:`asymvlm.confidence.fit_confidence`) or on a gallery's own captions
(:func:`asymvlm.confidence.fit_gallery_calibrator`), and saved in ``confidence.json``.
:mod:`asymvlm.confidence` exports :class:`Calibrator`.

Example:
    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> x = torch.randn(400, dtype=torch.float64)
    >>> right = (x + 0.5 * torch.randn(400, dtype=torch.float64) > 0).double()
    >>> cal = Calibrator.fit({"retrieval_entropy": -x}, right, by=None)
    >>> p = cal.predict({"retrieval_entropy": torch.tensor([-3.0, 3.0], dtype=torch.float64)})
    >>> bool(p[0] > 0.9 and p[1] < 0.1)
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from asymvlm.errors import ArtefactError, ConfigError, InputError
from asymvlm.familiarity import finite_float64, tail_p_value

__all__ = ["Calibrator", "CLIP_Z", "GATE_POINTS"]

CLIP_Z = 8.0  # standardised calibrator inputs are clipped to [-CLIP_Z, CLIP_Z]
GATE_POINTS = 512  # quantiles of the fitted answers' unfamiliarity kept per stratum


def _logistic_fit(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by L-BFGS (hand-written: scikit-learn is not a dependency
    and this is twelve lines of scipy). ``x`` standardised (n, f), ``y`` in {0, 1}."""
    from scipy.optimize import minimize
    from scipy.special import expit, log_expit

    n, f = x.shape

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:f], theta[f]
        z = x @ w + b
        nll = -(y * log_expit(z) + (1 - y) * log_expit(-z)).sum() + 0.5 * l2 * (w @ w)
        r = expit(z) - y
        return float(nll) / n, np.concatenate([x.T @ r + l2 * w, [r.sum()]]) / n

    base = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    theta0 = np.concatenate([np.zeros(f), [math.log(base / (1 - base))]])
    res = minimize(loss, theta0, jac=True, method="L-BFGS-B", options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-15})
    return res.x[:f], float(res.x[f])


def _json_object(d: Any, keys: Sequence[str], where: str, what: str) -> None:
    """``d`` is a JSON object whose keys are among ``keys`` (else one ArtefactError naming them)."""
    if not isinstance(d, Mapping):
        raise ArtefactError(f"{where}: {what} must be a JSON object")
    unknown = sorted(set(d) - set(keys))
    if unknown:
        raise ArtefactError(f"{where}: unknown calibrator key(s) {unknown}")


@dataclass
class _Logistic:
    """One logistic model on standardised features (a stratum of a :class:`Calibrator`)."""

    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    count: int = 0
    base_rate: float = math.nan
    degenerate: str | None = None

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, l2: float) -> _Logistic:
        mean = x.mean(0)
        scale = x.std(0)
        # a constant part (up to rounding: float32 kappas read back in float64) carries no information;
        # standardising its rounding noise would make it a large random feature
        scale[scale <= 1e-6 * np.maximum(1.0, np.abs(mean))] = 1.0
        right = int(y.sum())
        if min(right, y.size - right) < 5:
            rate = (right + 1) / (y.size + 2)
            why = f"only {right} right and {y.size - right} wrong answers: the smoothed base rate"
            return cls(
                mean.tolist(),
                scale.tolist(),
                [0.0] * x.shape[1],
                math.log(rate / (1 - rate)),
                y.size,
                float(y.mean()),
                why,
            )
        w, b = _logistic_fit((x - mean) / scale, y, l2)
        return cls(mean.tolist(), scale.tolist(), w.tolist(), b, y.size, float(y.mean()))

    def logit(self, x: Tensor) -> Tensor:
        m, s, w = (torch.tensor(v, dtype=torch.float64) for v in (self.mean, self.scale, self.coef))
        # a part far outside what calibration saw (another gallery, a constant-looking part) is held at
        # CLIP_Z standard deviations instead of extrapolating the log-odds linearly without bound
        return ((x - m) / s).clamp(-CLIP_Z, CLIP_Z) @ w + self.intercept

    KEYS = ("mean", "scale", "coef", "intercept", "count", "base_rate", "degenerate")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.KEYS}

    @classmethod
    def from_dict(cls, d: Any, f: int, where: str) -> _Logistic:
        _json_object(d, cls.KEYS, where, "a calibrator stratum")
        try:
            nums = [list(map(float, d[k])) for k in ("mean", "scale", "coef")]
            intercept = float(d["intercept"])
            count, rate = int(d.get("count", 0)), float(d.get("base_rate", math.nan))
        except (KeyError, TypeError, ValueError) as err:
            raise ArtefactError(f"{where}: malformed calibrator ({err!r})") from err
        if any(len(part) != f for part in nums) or not all(
            math.isfinite(x) for part in nums for x in part + [intercept]
        ):
            raise ArtefactError(f"{where}: calibrator arrays do not match its {f} features or are not finite")
        if any(v <= 0 for v in nums[1]):
            raise ArtefactError(f"{where}: calibrator scales must be positive")
        return cls(nums[0], nums[1], nums[2], intercept, count, rate, d.get("degenerate"))


@dataclass
class Calibrator:
    """``P(right | parts)``: logistic regression on standardised parts (Platt 1999), one model per
    stratum of the ``by`` part (the text's ambiguity by default), optionally followed by isotonic
    regression of its output (Zadrozny & Elkan 2002; monotone, so the order is the logistic's).

    Why strata: whether a vague caption's answer is right depends on what "right" means (a vague
    caption's best image usually satisfies it, but is rarely its own image), and within one level of
    specificity the gallery around the query decides. One logistic model over every level learns the
    across-level trend and can get the within-level sign of the retrieval entropy backwards (Simpson's
    paradox; measured on the emoji benchmark: error AUROC 0.41 among the most specific captions with
    one model, 0.73-0.76 with strata). Equal-count strata of the ambiguity, each with enough right and
    wrong answers, let each level learn its own weights.

    Attributes:
        features: the part names, in column order.
        strata: one :class:`_Logistic` per stratum, in ascending order of ``by``.
        by: the stratifying part (None: one stratum).
        edges: the inner stratum edges on ``by`` (``len(strata) - 1``, ascending).
        isotonic: None, or ``(x, y)`` knots of a monotone map from the logistic probability to the
            isotonic one (linear interpolation between knots).
        info: what it was fitted on: ``label`` (what "right" meant), ``gallery_size``, ``count``,
            ``base_rate`` (the fraction right), ``direction`` (``text_to_image`` or ``zero_shot``), ``method``.
        gate: with an ``unfamiliarity`` part, per stratum the sorted unfamiliarity of the answers it
            was fitted on (at most :data:`GATE_POINTS` quantiles): how unfamiliar a text of that kind
            may be and still be covered by the fit (:meth:`gate_p_value`).
    """

    features: tuple[str, ...]
    strata: list[_Logistic]
    by: str | None = None
    edges: list[float] = field(default_factory=list)
    isotonic: tuple[list[float], list[float]] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    gate: list[list[float]] | None = None

    @classmethod
    def fit(
        cls,
        features: Mapping[str, Tensor],
        correct: Tensor,
        *,
        method: str = "logistic",
        l2: float = 1.0,
        by: str | None = "ambiguity",
        max_strata: int = 4,
        min_stratum: int = 300,
        min_class: int = 10,
        info: Mapping[str, Any] | None = None,
    ) -> Calibrator:
        """Fit on parts ``{name: (n,)}`` and outcomes ``correct`` (n,) bool.

        Args:
            method: ``logistic`` or ``logistic+isotonic``.
            l2: the L2 penalty on the standardised coefficients (summed loss; 1 is weak for n >= 100).
            by: the part whose equal-count strata get a model each (None, or a part not given: one).
            max_strata, min_stratum: at most ``min(max_strata, n // min_stratum)`` strata ...
            min_class: ... and neighbours are merged until each holds this many right and wrong answers.

        A stratum with fewer than 5 right or 5 wrong outcomes predicts its smoothed base rate
        ``(right + 1) / (n + 2)`` (``degenerate`` says so).
        """
        if method not in ("logistic", "logistic+isotonic"):
            raise ConfigError(f"unknown calibration method {method!r}; choose 'logistic' or 'logistic+isotonic'")
        names = tuple(features)
        if not names:
            raise InputError("a calibrator needs at least one feature")
        y = finite_float64(correct, "correct").numpy().reshape(-1)
        cols = [finite_float64(features[k], f"feature {k!r}").numpy().reshape(-1) for k in names]
        if any(c.shape != y.shape for c in cols) or y.size == 0:
            raise InputError(
                f"every feature and 'correct' need the same non-zero length, got {[c.size for c in cols]} / {y.size}"
            )
        if min_stratum < 1 or max_strata < 1:
            raise ConfigError("max_strata and min_stratum must be >= 1")
        x = np.stack(cols, 1)
        edges: list[float] = []
        if by in names:
            edges = _strata_edges(x[:, names.index(by)], y, min(max_strata, y.size // min_stratum), min_class)
        if not edges:
            by = None
        group = np.searchsorted(np.asarray(edges), x[:, names.index(by)], side="right") if by else np.zeros(y.size, int)
        strata = [_Logistic.fit(x[group == g], y[group == g], l2) for g in range(len(edges) + 1)]
        meta = {"count": int(y.size), "base_rate": float(y.mean()), **dict(info or {}), "method": method}
        gate = None
        if "unfamiliarity" in names:
            u = x[:, names.index("unfamiliarity")]
            gate = []
            for g in range(len(edges) + 1):
                vals = np.sort(u[group == g])
                if vals.size > GATE_POINTS:
                    vals = np.quantile(vals, np.linspace(0, 1, GATE_POINTS))
                gate.append(vals.tolist())
        cal = cls(names, strata, by, [float(e) for e in edges], None, meta, gate)
        if method == "logistic+isotonic":
            from scipy.optimize import isotonic_regression

            p = cal._logistic(torch.from_numpy(x)).numpy()
            order = np.argsort(p, kind="stable")
            cal.isotonic = (p[order].tolist(), isotonic_regression(y[order]).x.tolist())
        return cal

    def _groups(self, x: Tensor) -> Tensor:
        """(n,) each row's stratum."""
        if self.by is None:
            return torch.zeros(x.shape[0], dtype=torch.int64)
        key = x[:, self.features.index(self.by)].contiguous()
        return torch.searchsorted(torch.tensor(self.edges, dtype=torch.float64), key, right=True)

    def _logistic(self, x: Tensor) -> Tensor:
        if self.by is None:
            return torch.sigmoid(self.strata[0].logit(x))
        group = self._groups(x)
        z = torch.empty(x.shape[0], dtype=torch.float64)
        for g, model in enumerate(self.strata):
            rows = group == g
            if bool(rows.any()):
                z[rows] = model.logit(x[rows])
        return torch.sigmoid(z)

    def _matrix(self, features: Mapping[str, Tensor]) -> Tensor:
        missing = [k for k in self.features if k not in features]
        if missing:
            raise InputError(f"the calibrator needs the part(s) {missing}; got {sorted(features)}")
        return torch.stack([finite_float64(features[k], f"feature {k!r}").reshape(-1) for k in self.features], 1)

    def gate_p_value(self, features: Mapping[str, Tensor]) -> Tensor | None:
        """(n,) how covered each answer's unfamiliarity is by the fit: its tail p-value
        (:func:`tail_p_value`) among the unfamiliarity of the fitted answers of its own stratum, so a
        specific text is compared with specific texts and a vague one with vague ones. None without
        an ``unfamiliarity`` part."""
        if self.gate is None:
            return None
        x = self._matrix(features)
        group = self._groups(x)
        u = x[:, self.features.index("unfamiliarity")]
        p = torch.ones(x.shape[0], dtype=torch.float64)
        for g, ref in enumerate(self.gate):
            rows = group == g
            if bool(rows.any()) and ref:
                p[rows] = tail_p_value(torch.tensor(ref, dtype=torch.float64), u[rows])
        return p

    def predict(self, features: Mapping[str, Tensor]) -> Tensor:
        """(n,) float64 probability of being right."""
        x = self._matrix(features)
        p = self._logistic(x)
        if self.isotonic is not None:
            px, py = self.isotonic
            p = torch.from_numpy(np.interp(p.numpy(), np.asarray(px), np.asarray(py)))
        return p

    def weights(self) -> dict[str, float]:
        """Each part's weight on the standardised log-odds, averaged over the strata by their counts
        (negative: that part lowers P(right)); :attr:`strata` holds each stratum's own."""
        total = sum(m.count for m in self.strata) or 1
        return {f: sum(m.coef[i] * m.count for m in self.strata) / total for i, f in enumerate(self.features)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "strata": [m.to_dict() for m in self.strata],
            "by": self.by,
            "edges": self.edges,
            "isotonic": None if self.isotonic is None else [list(self.isotonic[0]), list(self.isotonic[1])],
            "info": self.info,
            "gate": self.gate,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "calibrator") -> Calibrator:
        _json_object(d, ("features", "strata", "by", "edges", "isotonic", "info", "gate"), where, "a calibrator")
        try:
            feats = tuple(str(f) for f in d["features"])
            edges = [float(e) for e in d.get("edges") or []]
            iso = d.get("isotonic")
            if iso is not None:
                iso = (list(map(float, iso[0])), list(map(float, iso[1])))
            raw = list(d["strata"])
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise ArtefactError(f"{where}: malformed calibrator ({err!r})") from err
        strata = [_Logistic.from_dict(m, len(feats), where) for m in raw]
        by = d.get("by")
        if (
            not strata
            or len(edges) != len(strata) - 1
            or (by is None) != (not edges)
            or (by is not None and by not in feats)
        ):
            raise ArtefactError(f"{where}: the calibrator's strata, edges and 'by' do not match")
        if not all(math.isfinite(e) for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ArtefactError(f"{where}: stratum edges must be finite and increasing")
        if iso is not None and (
            len(iso[0]) != len(iso[1]) or not iso[0] or np.any(np.diff(iso[0]) < 0)
            or not all(math.isfinite(v) for part in iso for v in part)
        ):  # fmt: skip
            raise ArtefactError(f"{where}: isotonic knots must be non-empty, paired, finite and sorted")
        info = d.get("info") or {}
        if not isinstance(info, Mapping):
            raise ArtefactError(f"{where}: 'info' must be an object")
        gate = d.get("gate")
        if gate is not None:
            try:
                gate = [[float(v) for v in ref] for ref in gate]
            except (TypeError, ValueError) as err:
                raise ArtefactError(f"{where}: malformed gate ({err!r})") from err
            if (
                len(gate) != len(strata)
                or "unfamiliarity" not in feats
                or not all(math.isfinite(v) for ref in gate for v in ref)
                or any(b < a for ref in gate for a, b in zip(ref, ref[1:]))
            ):
                raise ArtefactError(
                    f"{where}: the gate needs one sorted, finite list per stratum and an unfamiliarity part"
                )
        return cls(feats, strata, by, edges, iso, dict(info), gate)


def _strata_edges(key: np.ndarray, y: np.ndarray, k: int, min_class: int) -> list[float]:
    """Inner edges of up to ``k`` equal-count strata of ``key``, adjacent strata merged until each has
    ``min_class`` right and wrong answers (ties never split: edges are distinct values)."""
    if k <= 1:
        return []
    edges = sorted(set(np.quantile(key, np.linspace(0, 1, k + 1)[1:-1]).tolist()))

    def counts(e: list[float]) -> list[tuple[int, int]]:
        g = np.searchsorted(np.asarray(e), key, side="right")
        return [(int(y[g == i].sum()), int((g == i).sum() - y[g == i].sum())) for i in range(len(e) + 1)]

    while edges:
        c = counts(edges)
        bad = [i for i, (r, w) in enumerate(c) if min(r, w) < min_class]
        if not bad:
            break
        i = bad[0]  # merge the first short stratum into a neighbour: drop the edge between them
        edges.pop(i if i < len(edges) else i - 1)
    return edges
