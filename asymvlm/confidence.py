"""How likely is an answer right? The parts of a retrieval's uncertainty and one calibrated probability.

A text's concentration ``kappa`` says how vague the text is. It cannot say whether a retrieval will
succeed: that also depends on the gallery around the query and on what the encoder knows
(DESIGN.md, "Known traps"). An answer's uncertainty here has three parts, each readable alone:

* **ambiguity** (aleatoric, of the text): ``1/kappa`` from the head;
* **retrieval** (the gallery around the query): the entropy of the head's retrieval distribution
  ``p(i | t) ∝ q_t(x_i)`` over the searched collection, and the probability of the returned best
  image. With the frozen mean direction the head's ``kappa`` is the temperature: a vague text
  spreads over many images, a specific text in a crowded neighbourhood spreads over its near
  neighbours, a specific text with a clear winner does not. ``exp(entropy)`` is the effective
  number of competing images. Computed in the top-k's own streamed pass
  (:class:`asymvlm.retrieval.OnlineSoftmax`);
* **unfamiliarity** (epistemic): how far the query's frozen text embedding lies from the texts the
  model was trained on, under a compact density fitted at training time and saved with the model
  (:class:`Familiarity`, a mixture of von Mises-Fisher components with one shared concentration).

They combine into ``p_correct``, the probability that the top-1 answer is right, by a
:class:`Calibrator` fitted on a validation split (logistic regression on the parts, Platt 1999, one
model per stratum of the ambiguity; optionally followed by isotonic regression, Zadrozny & Elkan
2002). What "right" means is recorded with the calibrator (``label``): the image satisfies the query
where the data say so (ShapeWorld's consistency, identical captions), else the caption's own image.
The retrieval parts depend on the gallery, so a calibrator records the gallery size it was fitted
on; ``asymvlm-serve`` refits one per gallery from the gallery's own captions. A query stranger than
what the calibrator saw for texts of its kind gets no confident answer: below a p-value of
``familiarity_alpha`` (its unfamiliarity among the calibrated answers of its stratum, with an
exponential tail beyond them), ``p_correct`` is scaled by ``p / familiarity_alpha``
(:meth:`ConfidenceModel.assess`).

Without a calibrator the parts are reported alone and ``p_correct`` is None ("uncalibrated").

Example:
    >>> import torch
    >>> from asymvlm.heads import TextHead
    >>> from asymvlm.model import AsymVLM
    >>> torch.manual_seed(0) and None
    >>> model = AsymVLM(TextHead(dim=8, hidden_dims=(16,)))
    >>> images = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1)
    >>> texts = torch.nn.functional.normalize(images + 0.3 * torch.randn(40, 8), dim=-1)
    >>> conf = fit_confidence(model, images, texts, torch.arange(40), train_texts=texts)
    >>> model.confidence = conf
    >>> from asymvlm.retrieval import ImageIndex
    >>> res = ImageIndex(images).search(texts[:2], k=3, model=model)
    >>> sorted(res.to_dict()["queries"][0]["confidence"])[:3]
    ['ambiguity', 'ambiguity_percentile', 'calibrated']
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from asymvlm.errors import ArtefactError, ConfigError, InputError
from asymvlm.io import atomic_save_safetensors, atomic_write_json, load_safetensors, read_tagged_json

__all__ = [
    "Familiarity",
    "tail_p_value",
    "percentile_of",
    "Calibrator",
    "ConfidenceModel",
    "AnswerConfidence",
    "answer_features",
    "fit_confidence",
    "fit_gallery_calibrator",
    "zero_shot_features",
    "retrieval_labels",
    "CONFIDENCE_NAME",
    "FAMILIARITY_NAME",
]

CLIP_Z = 8.0  # standardised calibrator inputs are clipped to [-CLIP_Z, CLIP_Z]
GATE_POINTS = 512  # quantiles of the fitted answers' unfamiliarity kept per stratum
CONFIDENCE_NAME = "confidence.json"
FAMILIARITY_NAME = "familiarity.safetensors"
CONFIDENCE_TYPE = "asymvlm.confidence"
CONFIDENCE_VERSION = 1


def _float64(x: Any, name: str) -> Tensor:
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{name} contains NaN or inf")
    return t


# ----------------------------------------------------------------------------------------------
# unfamiliarity: a vMF mixture density of the training texts
# ----------------------------------------------------------------------------------------------
def _kmeans_pp(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding on the sphere (distance 1 - cos; Arthur & Vassilvitskii 2007)."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [x[first]]
    d2 = (1 - x @ x[first]).clamp_min(0)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than k: the rest repeat
            centers.append(x[int(torch.randint(n, (1,), generator=gen))])
            continue
        j = int(torch.multinomial(d2 / total, 1, generator=gen))
        centers.append(x[j])
        d2 = torch.minimum(d2, (1 - x @ x[j]).clamp_min(0))
    return torch.stack(centers)


def _banerjee_kappa(r: float, d: int) -> float:
    """The vMF concentration of mean resultant length ``r`` in ``d`` dimensions (Banerjee et al.
    2005, eq. 4.4: ``kappa ~ r (d - r^2) / (1 - r^2)``), bounded to [1e-3, 1e5]."""
    r = min(max(r, 1e-6), 1 - 1e-9)
    return float(min(max(r * (d - r * r) / (1 - r * r), 1e-3), 1e5))


@dataclass
class Familiarity:
    """How typical a unit embedding is of a reference set (the texts a head was trained on).

    A mixture of ``K`` von Mises-Fisher components with one shared concentration ``kappa``, fitted by
    spherical k-means (Dhillon & Modha 2001) with the shared ``kappa`` from the pooled mean resultant
    length (Banerjee et al. 2005). The unfamiliarity of ``x`` is a soft cosine distance to the
    mixture, ``1 - (1/kappa) log sum_k pi_k exp(kappa mu_k^T x)``: about ``1 - max_k mu_k^T x`` (0 on
    a component's mean, 2 at its antipode), larger = less familiar. The shared normaliser cancels, so
    this is the mixture's negative log-density up to an affine map. It stores only the ``K``
    component means (each the mean of many texts), never the texts or their embeddings.

    Attributes:
        means: (K, d) unit component means.
        log_weights: (K,) log mixing weights.
        kappa: the shared concentration.
        reference: sorted unfamiliarity of held-out reference texts (the percentile scale).
        count: how many embeddings the density was fitted on.
    """

    means: Tensor
    log_weights: Tensor
    kappa: float
    reference: Tensor
    count: int

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def fit(
        cls,
        embeddings: Tensor,
        *,
        components: int | None = None,
        iterations: int = 25,
        max_points: int = 100_000,
        holdout: float = 0.2,
        seed: int = 0,
    ) -> Familiarity:
        """Fit to (N, d) unit embeddings (rows may repeat: repeats weigh as often as they occur).

        Args:
            embeddings: the reference set (e.g. a head's training texts, frozen embeddings).
            components: K (default ``clamp(N_fit // 16, 1, 1024)``: about 16 embeddings per mean).
            iterations: spherical k-means iterations.
            max_points: a uniform subsample of at most this many rows is used.
            holdout: fraction of rows held out of the fit; their unfamiliarity is the reference
                scale (percentiles), so that in-distribution text sits at its true percentile.
            seed: the subsample, the split and the k-means++ seeding.
        """
        x = _float64(embeddings, "embeddings").float()
        if x.dim() != 2 or x.shape[0] < 2:
            raise InputError(f"fitting a familiarity density needs (N >= 2, d) embeddings, got {tuple(x.shape)}")
        norms = x.norm(dim=1)
        if bool(((norms - 1).abs() > 1e-3).any()):
            raise InputError("familiarity embeddings must be unit vectors")
        gen = torch.Generator().manual_seed(seed)
        if x.shape[0] > max_points:
            x = x[torch.randperm(x.shape[0], generator=gen)[:max_points]]
        perm = torch.randperm(x.shape[0], generator=gen)
        n_hold = int(round(holdout * x.shape[0])) if x.shape[0] >= 10 else 0
        held, fit = x[perm[:n_hold]], x[perm[n_hold:]]
        k = components if components is not None else min(1024, max(1, fit.shape[0] // 16))
        if not 1 <= k <= fit.shape[0]:
            raise ConfigError(f"components must be in [1, {fit.shape[0]}], got {k}")
        means = _kmeans_pp(fit, k, gen)
        for _ in range(iterations):
            assign = (fit @ means.T).argmax(1)
            sums = torch.zeros_like(means).index_add_(0, assign, fit)
            empty = sums.norm(dim=1) == 0
            new = torch.nn.functional.normalize(sums, dim=1)
            new[empty] = means[empty]
            if torch.equal(new, means):
                break
            means = new
        assign = (fit @ means.T).argmax(1)
        counts = torch.bincount(assign, minlength=k).double()
        keep = counts > 0
        means, counts = means[keep], counts[keep]
        r = float((fit @ means.T).amax(1).double().mean())  # each text's cosine to its nearest mean
        fam = cls(
            means, torch.log(counts / counts.sum()).float(), _banerjee_kappa(r, x.shape[1]), torch.empty(0), len(x)
        )
        ref = held if held.shape[0] else fit
        fam.reference = torch.sort(fam.score(ref).double()).values
        return fam

    def score(self, x: Tensor, chunk: int = 8192) -> Tensor:
        """(N,) unfamiliarity of unit embeddings ``x`` (N, d) (float32)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise InputError(f"need (N, {self.dim}) embeddings, got {tuple(x.shape)}")
        out = []
        for s in range(0, x.shape[0], chunk):
            cos = x[s : s + chunk].float() @ self.means.T  # (n, K)
            lse = torch.logsumexp(self.kappa * cos.double() + self.log_weights.double(), dim=1)
            out.append((1 - lse / self.kappa).float())
        return torch.cat(out) if out else torch.empty(0)

    def percentile(self, u: Tensor) -> Tensor:
        """(N,) mid-rank percentile of unfamiliarity ``u`` among the reference texts (0-100)."""
        return percentile_of(self.reference, u)

    def p_value(self, u: Tensor, tail: float = 0.1) -> Tensor:
        """(N,) the chance that a reference text is at least this unfamiliar (:func:`tail_p_value`)."""
        return tail_p_value(self.reference, u, tail)

    def tensors(self) -> dict[str, Tensor]:
        return {"means": self.means.float(), "log_weights": self.log_weights.float(), "reference": self.reference}

    def meta(self) -> dict[str, Any]:
        return {"kappa": self.kappa, "count": self.count, "components": int(self.means.shape[0]), "dim": self.dim}

    @classmethod
    def from_saved(cls, tensors: Mapping[str, Tensor], meta: Mapping[str, Any], where: str) -> Familiarity:
        missing = {"means", "log_weights", "reference"} - set(tensors)
        if missing:
            raise ArtefactError(f"{where}: missing tensor(s) {sorted(missing)}")
        means, lw, ref = tensors["means"].float(), tensors["log_weights"].float(), tensors["reference"].double()
        kappa = meta.get("kappa")
        if (
            means.dim() != 2
            or lw.shape != means.shape[:1]
            or ref.dim() != 1
            or not isinstance(kappa, (int, float))
            or not 0 < kappa < math.inf
        ):
            raise ArtefactError(f"{where}: inconsistent familiarity density (means, weights, kappa)")
        for name, t in (("means", means), ("log_weights", lw), ("reference", ref)):
            if not bool(torch.isfinite(t).all()):
                raise ArtefactError(f"{where}: {name} contains NaN or inf")
        if bool(((means.norm(dim=1) - 1).abs() > 1e-3).any()):
            raise ArtefactError(f"{where}: familiarity means are not unit vectors")
        if ref.numel() > 1 and bool((ref[1:] < ref[:-1]).any()):
            raise ArtefactError(f"{where}: the familiarity reference is not sorted")
        return cls(means, lw, float(kappa), ref, int(meta.get("count", 0)))


def tail_p_value(sorted_ref: Tensor, u: Tensor, tail: float = 0.1) -> Tensor:
    """(N,) the chance that a reference value is at least ``u``: the conformal p-value
    ``(1 + #{reference >= u}) / (n + 1)`` (Vovk et al. 2005) inside the reference's bulk, and beyond
    its ``1 - tail`` quantile an exponential tail fitted to the excesses over that quantile (peaks
    over threshold, Pickands 1975), so that a value beyond every reference value still gets a graded,
    ever smaller p-value.

    Example:
        >>> ref = torch.arange(100, dtype=torch.float64)
        >>> [round(float(p), 4) for p in tail_p_value(ref, torch.tensor([50.0, 99.0, 200.0]))]
        [0.505, 0.0177, 0.0]
    """
    ref = sorted_ref.double()
    u = u.double().contiguous()
    above = ref.numel() - torch.searchsorted(ref, u, right=False)
    p = (1.0 + above.double()) / (ref.numel() + 1.0)
    n_tail = int(math.floor(tail * ref.numel()))
    if n_tail >= 2:
        threshold = ref[ref.numel() - n_tail - 1]
        scale = float((ref[ref.numel() - n_tail :] - threshold).mean())
        if scale > 0:
            p_tail = (n_tail + 1.0) / (ref.numel() + 1.0) * torch.exp(-(u - threshold) / scale)
            p = torch.where(u > threshold, p_tail, p)
    return p


def percentile_of(sorted_ref: Tensor, u: Tensor) -> Tensor:
    """(N,) float64 mid-rank percentile (0-100; ties count half, so a value equal to every reference
    sits at 50) of each ``u`` among ``sorted_ref``; NaN without a reference.

    Example:
        >>> ref = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
        >>> percentile_of(ref, torch.tensor([0.2, 1.0], dtype=torch.float64)).tolist()
        [50.0, 100.0]
    """
    u = u.double().contiguous()
    if sorted_ref.numel() == 0:
        return torch.full_like(u, math.nan)
    sorted_ref = sorted_ref.double()
    below = torch.searchsorted(sorted_ref, u, right=False)
    at_or_below = torch.searchsorted(sorted_ref, u, right=True)
    return 100.0 * (below + at_or_below).double() / (2 * sorted_ref.numel())


# ----------------------------------------------------------------------------------------------
# the calibrator: parts -> P(right)
# ----------------------------------------------------------------------------------------------
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
        y = _float64(correct, "correct").numpy().reshape(-1)
        cols = [_float64(features[k], f"feature {k!r}").numpy().reshape(-1) for k in names]
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
        return torch.stack([_float64(features[k], f"feature {k!r}").reshape(-1) for k in self.features], 1)

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


# ----------------------------------------------------------------------------------------------
# parts of an answer
# ----------------------------------------------------------------------------------------------
def answer_features(
    kappa: Tensor, entropy: Tensor, top_probability: Tensor, gallery_size: int, unfamiliarity: Tensor | None
) -> dict[str, Tensor]:
    """The calibrator's features of text -> image answers (float64, (Q,) each): ``ambiguity``
    ``log(1/kappa)``, ``retrieval_entropy`` the entropy over ``log N`` and ``top_surprise``
    ``-log p(best)`` over ``log N`` (both in [0, 1]: 0 for one clear winner, 1 for a uniform spread, on
    a gallery of any size N), and ``unfamiliarity`` when known."""
    log_n = max(math.log(gallery_size), 1e-12)
    out = {
        "ambiguity": -torch.log(_float64(kappa, "kappa").clamp_min(1e-30)),
        "retrieval_entropy": _float64(entropy, "entropy") / log_n,
        "top_surprise": -torch.log(_float64(top_probability, "top probability").clamp_min(1e-300)) / log_n,
    }
    if unfamiliarity is not None:
        out["unfamiliarity"] = _float64(unfamiliarity, "unfamiliarity")
    return out


@dataclass
class AnswerConfidence:
    """Per query: the parts of an answer's uncertainty and the probability that its best hit is right.

    Attributes:
        ambiguity: (Q,) ``1/kappa`` of the query text (or of the predicted class prompt).
        ambiguity_percentile: (Q,) its percentile among the reference captions (NaN: no reference).
        entropy: (Q,) the retrieval distribution's entropy (nats) over the searched collection.
        effective_candidates: (Q,) ``exp(entropy)``.
        top_probability: (Q,) the best hit's probability under that distribution.
        unfamiliarity: (Q,) or None (no density saved with the model).
        unfamiliarity_percentile: (Q,) its percentile among held-out training texts, or None.
        p_correct: (Q,) P(the best hit is right), or None (uncalibrated).
        calibration: how ``p_correct`` was obtained (``source``, ``label``, ``gallery_size``...), or
            ``{"source": None, "reason": ...}`` when it was not.
    """

    ambiguity: Tensor
    ambiguity_percentile: Tensor
    entropy: Tensor
    effective_candidates: Tensor
    top_probability: Tensor
    unfamiliarity: Tensor | None = None
    unfamiliarity_percentile: Tensor | None = None
    p_correct: Tensor | None = None
    calibration: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.ambiguity.numel()

    def to_dict(self, q: int) -> dict[str, Any]:
        """Query ``q``'s parts, JSON-ready (non-finite numbers None)."""

        def num(t: Tensor | None) -> float | None:
            if t is None:
                return None
            v = float(t[q])
            return v if math.isfinite(v) else None

        return {
            "p_correct": num(self.p_correct),
            "calibrated": self.p_correct is not None,
            "ambiguity": num(self.ambiguity),
            "ambiguity_percentile": num(self.ambiguity_percentile),
            "retrieval_entropy": num(self.entropy),
            "effective_candidates": num(self.effective_candidates),
            "top_probability": num(self.top_probability),
            "unfamiliarity": num(self.unfamiliarity),
            "unfamiliarity_percentile": num(self.unfamiliarity_percentile),
        }


@dataclass
class ConfidenceModel:
    """What a model carries to say how likely its answers are right (saved with it as
    ``confidence.json`` + ``familiarity.safetensors``).

    Attributes:
        familiarity: the density of the training texts' frozen embeddings, or None.
        calibrator: text -> image ``P(right | parts)``, or None (parts reported uncalibrated).
        ambiguity_reference: sorted ``1/kappa`` of the calibration captions (the percentile scale).
        familiarity_alpha: below this p-value of the query's unfamiliarity (among the calibrated
            answers of its stratum: :meth:`Calibrator.gate_p_value`; else among held-out training
            texts), ``p_correct`` is scaled by ``p / alpha``: a query stranger than what the
            calibrator saw for texts of its kind is not confidently right.
    """

    familiarity: Familiarity | None = None
    calibrator: Calibrator | None = None
    ambiguity_reference: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
    familiarity_alpha: float = 0.05

    def __post_init__(self) -> None:
        if not 0 <= self.familiarity_alpha < 1:
            raise ConfigError(f"familiarity_alpha must be in [0, 1), got {self.familiarity_alpha}")

    def unfamiliarity(self, text_embeddings: Tensor | None) -> Tensor | None:
        if self.familiarity is None or text_embeddings is None:
            return None
        return self.familiarity.score(text_embeddings.detach().float().cpu())

    def assess(
        self,
        kappa: Tensor,
        entropy: Tensor,
        top_probability: Tensor,
        gallery_size: int,
        text_embeddings: Tensor | None = None,
        calibrator: Calibrator | None = None,
        calibration_source: str | None = None,
    ) -> AnswerConfidence:
        """The parts and ``p_correct`` of Q text -> image answers.

        Args:
            kappa, entropy, top_probability: (Q,) each, from the head and the search.
            gallery_size: N, the searched collection's size.
            text_embeddings: (Q, d) frozen text embeddings (for unfamiliarity; None: not reported).
            calibrator: use this one (e.g. fitted on the served gallery) instead of the model's.
            calibration_source: recorded in ``calibration["source"]`` (default: what the calibrator's
                ``info["source"]`` says, else ``model``).
        """
        kappa = kappa.detach().double().cpu()
        entropy = entropy.detach().double().cpu()
        u = self.unfamiliarity(text_embeddings)
        amb = 1.0 / kappa
        conf = AnswerConfidence(
            ambiguity=amb,
            ambiguity_percentile=percentile_of(self.ambiguity_reference, amb),
            entropy=entropy,
            effective_candidates=torch.exp(entropy),
            top_probability=top_probability.detach().double().cpu(),
            unfamiliarity=u,
            unfamiliarity_percentile=None if u is None else self.familiarity.percentile(u),
        )
        cal = calibrator if calibrator is not None else self.calibrator
        if cal is None:
            conf.calibration = {"source": None, "reason": "no calibrator: fit one on a validation split"}
            return conf
        if "unfamiliarity" in cal.features and u is None:
            conf.calibration = {"source": None, "reason": "the calibrator needs unfamiliarity (text embeddings)"}
            return conf
        feats = answer_features(kappa, conf.entropy, conf.top_probability, gallery_size, u)
        p = cal.predict(feats)
        if u is not None and self.familiarity_alpha > 0:
            # beyond what calibration saw, its evidence does not apply: scale by the p-value of the
            # query's unfamiliarity among the calibrated answers of its kind (the training texts'
            # when the calibrator was fitted without unfamiliarity)
            pv = cal.gate_p_value(feats)
            if pv is None:
                pv = self.familiarity.p_value(u)
            p = p * (pv / self.familiarity_alpha).clamp_max(1.0)
        conf.p_correct = p
        fitted_n = cal.info.get("gallery_size")
        conf.calibration = {
            "source": calibration_source or cal.info.get("source") or "model",
            "label": cal.info.get("label"),
            "gallery_size": fitted_n,
            "matches_gallery": fitted_n == gallery_size,
        }
        return conf

    # -- persistence ----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write ``confidence.json`` (and ``familiarity.safetensors``) into a model folder, atomically."""
        directory = Path(directory)
        doc: dict[str, Any] = {
            "type": CONFIDENCE_TYPE,
            "format_version": CONFIDENCE_VERSION,
            "calibrator": None if self.calibrator is None else self.calibrator.to_dict(),
            "familiarity": None,
            "familiarity_alpha": self.familiarity_alpha,
        }
        tensors = {"ambiguity_reference": self.ambiguity_reference.double()}
        if self.familiarity is not None:
            doc["familiarity"] = self.familiarity.meta()
            tensors.update({f"familiarity.{k}": v for k, v in self.familiarity.tensors().items()})
        atomic_save_safetensors(tensors, directory / FAMILIARITY_NAME)
        atomic_write_json(doc, directory / CONFIDENCE_NAME)

    @classmethod
    def load(cls, directory: str | Path) -> ConfidenceModel:
        directory = Path(directory)
        doc = read_tagged_json(
            directory / CONFIDENCE_NAME,
            CONFIDENCE_TYPE,
            CONFIDENCE_VERSION,
            required=("calibrator", "familiarity"),
            known=("familiarity_alpha",),
        )
        t = load_safetensors(directory / FAMILIARITY_NAME, mmap=False)
        where = str(directory / FAMILIARITY_NAME)
        fam = None
        if doc["familiarity"] is not None:
            if not isinstance(doc["familiarity"], Mapping):
                raise ArtefactError(f"{directory / CONFIDENCE_NAME}: 'familiarity' must be an object or null")
            fam = Familiarity.from_saved(
                {k.removeprefix("familiarity."): v for k, v in t.items() if k.startswith("familiarity.")},
                doc["familiarity"],
                where,
            )
        cal = (
            None
            if doc["calibrator"] is None
            else Calibrator.from_dict(doc["calibrator"], str(directory / CONFIDENCE_NAME))
        )
        ref = t.get("ambiguity_reference", torch.empty(0)).double()
        if ref.dim() != 1 or not bool(torch.isfinite(ref).all()):
            raise ArtefactError(f"{where}: ambiguity_reference must be a finite vector")
        alpha = doc.get("familiarity_alpha", 0.05)
        if not isinstance(alpha, (int, float)) or not 0 <= alpha < 1:
            raise ArtefactError(f"{directory / CONFIDENCE_NAME}: familiarity_alpha must be in [0, 1)")
        return cls(fam, cal, torch.sort(ref).values, float(alpha))


# ----------------------------------------------------------------------------------------------
# fitting
# ----------------------------------------------------------------------------------------------
def retrieval_labels(top1: Tensor, positives: Tensor) -> Tensor:
    """(Q,) bool: the best hit is a positive. ``positives`` is (Q, N) bool (the images that satisfy
    each query), or (Q,) int64 (each query's own image)."""
    if positives.dim() == 1:
        return top1 == positives.to(top1.device)
    return positives.gather(1, top1.unsqueeze(1).to(positives.device)).squeeze(1)


@torch.no_grad()
def fit_confidence(
    model: Any,
    image_embeddings: Tensor,
    text_embeddings: Tensor,
    positives: Tensor,
    *,
    train_texts: Tensor | None = None,
    familiarity: Familiarity | None = None,
    label: str = "own image",
    method: str = "logistic",
    familiarity_alpha: float = 0.05,
    seed: int = 0,
    source: str | None = None,
) -> ConfidenceModel:
    """Fit a model's :class:`ConfidenceModel` on a validation split.

    Args:
        model: the :class:`~asymvlm.model.AsymVLM` (its head maps the texts).
        image_embeddings: (N, d) the validation gallery (unit).
        text_embeddings: (Q, d) frozen embeddings of the validation captions.
        positives: (Q, N) bool (images that satisfy each caption) or (Q,) the caption's own image.
        train_texts: (M, d) frozen embeddings of the head's training texts: the familiarity density
            is fitted on them (None, and no ``familiarity``: unfamiliarity is not part of the model).
        familiarity: an already fitted density (instead of ``train_texts``).
        label: what "right" means for these positives (recorded, and reported with every figure).
        method: the calibrator's (:meth:`Calibrator.fit`).
        familiarity_alpha: see :class:`ConfidenceModel`.
        seed: the density's fit.
        source: what the split is, recorded (default ``a validation split of <Q> captions``).
    """
    from asymvlm.retrieval import ImageIndex

    if familiarity is None and train_texts is not None:
        familiarity = Familiarity.fit(train_texts, seed=seed)
    conf = ConfidenceModel(familiarity, None, familiarity_alpha=familiarity_alpha)
    index = ImageIndex(image_embeddings.float(), validate=True)
    emb = text_embeddings.float()
    conf.calibrator, res = _calibrate_on_captions(
        model,
        index,
        emb,
        lambda top: retrieval_labels(top, positives),
        conf.unfamiliarity(emb),
        method,
        {"label": label, "source": source or f"a validation split of {emb.shape[0]} captions"},
    )
    conf.ambiguity_reference = torch.sort(res.uncertainty.double()).values
    return conf


def _calibrate_on_captions(
    model: Any,
    index: Any,
    text_embeddings: Tensor,
    right: Any,
    unfamiliarity: Tensor | None,
    method: str,
    info: dict[str, Any],
) -> tuple[Calibrator, Any]:
    """Search each caption's best image, judge it (``right(top (Q,)) -> (Q,) bool``) and fit a
    :class:`Calibrator` on the parts; returns it and the search. Warns about a stratum too short of
    right or wrong answers to fit (it predicts its base rate)."""
    res = index.search(model.encode_text(text_embeddings), k=1)
    correct = right(res.indices[:, 0])
    feats = answer_features(1.0 / res.uncertainty.double(), res.entropy, res.posterior[:, 0], len(index), unfamiliarity)
    cal = Calibrator.fit(
        feats,
        correct,
        method=method,
        info={**info, "gallery_size": len(index), "direction": "text_to_image"},
    )
    for m in cal.strata:
        if m.degenerate:
            warnings.warn(f"confidence calibration: a stratum of {m.count} answers has {m.degenerate}", stacklevel=3)
    return cal, res


@torch.no_grad()
def fit_gallery_calibrator(
    model: Any,
    index: Any,
    caption_embeddings: Tensor,
    owner_offsets: Tensor,
    owner_rows: Tensor,
    *,
    max_captions: int = 2000,
    seed: int = 0,
    method: str = "logistic",
    label: str = "caption identity (the best image carries the caption)",
) -> Calibrator:
    """A text -> image calibrator for one served gallery, fitted on the gallery's own captions: a
    caption's answer is right when the best image is one of the caption's positives — by default the
    images that carry it (caption identity); where the collection knows which images a caption is
    true of (ShapeWorld), those.

    Args:
        model: the :class:`~asymvlm.model.AsymVLM` (its ``confidence.familiarity``, when present, adds
            unfamiliarity to the parts).
        index: the gallery's :class:`~asymvlm.retrieval.ImageIndex`.
        caption_embeddings: (M, d) the distinct captions' frozen text embeddings.
        owner_offsets, owner_rows: each caption's positive images, in compressed rows: caption
            ``c``'s are ``owner_rows[owner_offsets[c]:owner_offsets[c + 1]]``.
        max_captions: a seeded uniform sample of at most this many captions is searched (the
            fit's cost is one search of that many queries).
        seed: the sample.
        method: the calibrator's (:meth:`Calibrator.fit`).
        label: what the positives mean (recorded in the calibrator's ``info``).

    The gallery's captions describe images that are in the gallery; a query that fits none of them
    is not represented, and a gallery the head was trained on makes the fit optimistic.
    """
    m = caption_embeddings.shape[0]
    if owner_offsets.shape != (m + 1,) or int(owner_offsets[0]) != 0 or int(owner_offsets[-1]) != owner_rows.numel():
        raise InputError(f"caption owners do not match the {m} captions (offsets {tuple(owner_offsets.shape)})")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(m, generator=gen)[:max_captions] if m > max_captions else torch.arange(m)
    emb = caption_embeddings[pick].float()

    def right(top: Tensor) -> Tensor:
        rows = [set(owner_rows[int(owner_offsets[c]) : int(owner_offsets[c + 1])].tolist()) for c in pick.tolist()]
        return torch.tensor([t in r for t, r in zip(top.tolist(), rows)], dtype=torch.bool)

    confidence = getattr(model, "confidence", None)
    u = confidence.unfamiliarity(emb) if confidence is not None else None
    info = {"label": label, "source": "gallery captions"}
    return _calibrate_on_captions(model, index, emb, right, u, method, info)[0]


# ----------------------------------------------------------------------------------------------
# zero-shot
# ----------------------------------------------------------------------------------------------
def zero_shot_features(
    class_uncertainty: Tensor, probabilities: Tensor, unfamiliarity: Tensor | None = None
) -> dict[str, Tensor]:
    """The calibrator's features of zero-shot predictions: the predicted class prompt's
    ``log(1/kappa)``, the class posterior's entropy and ``-log`` of its top probability, both over
    ``log C`` (and the image's unfamiliarity when known)."""
    p = _float64(probabilities, "probabilities")
    c = p.shape[-1]
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    out = {
        "ambiguity": torch.log(_float64(class_uncertainty, "class uncertainty").clamp_min(1e-30)),
        "class_entropy": ent / max(math.log(c), 1e-12),
        "top_surprise": -torch.log(p.max(-1).values.clamp_min(1e-300)) / max(math.log(c), 1e-12),
    }
    if unfamiliarity is not None:
        out["unfamiliarity"] = _float64(unfamiliarity, "unfamiliarity")
    return out
