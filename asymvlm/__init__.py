"""asymvlm: calibrated uncertainty for frozen vision-language models (AsymVLM, NeurIPS 2025).

Frozen image embeddings stay deterministic; each text gets a distribution on the unit sphere
(von Mises–Fisher or Power Spherical) from a small head trained with InfoNCE over
log-likelihoods. See README.md for a tour.
"""

import os as _os
import sys as _sys

# Threading default, chosen from bench/contention.py (README "Performance on a shared machine"):
# torch's OpenMP (libgomp) worker threads spin about 3e5 times before they sleep; asymvlm lets them
# spin 1e3 (GOMP_SPINCOUNT=1000). On 2 cores beside two busy processes a head step at batch 512 took
# 16.6x its idle time with the default spinning and 2.5x with a short spin, for 1-8% more idle time
# (OMP_WAIT_POLICY=PASSIVE, no spin at all, cost 36% idle on a toy CLIP step). OpenMP reads its
# environment once, when torch loads, so this applies when asymvlm is imported first (every asymvlm
# command); a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept (OMP_WAIT_POLICY=ACTIVE restores
# torch's behaviour).
if "torch" not in _sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(_os.environ):
    _os.environ["GOMP_SPINCOUNT"] = "1000"

from asymvlm.cache import EmbeddingCache, embed_dataset, write_cache
from asymvlm.distributions import HypersphericalUniform, PowerSpherical, VonMisesFisher, sphere
from asymvlm.encoders import FrozenEncoder, load_encoder
from asymvlm.heads import HeadConfig, TextHead
from asymvlm.losses import AsymVLMLoss, log_likelihood, parameter_groups, positives_from_ids, symmetric_infonce
from asymvlm.model import AsymVLM
from asymvlm.retrieval import ImageIndex, SearchResult, TextIndex
from asymvlm.special import bessel_ratio, log_bessel_iv, vmf_log_normalizer
from asymvlm.zeroshot import zero_shot_classify

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "VonMisesFisher",
    "PowerSpherical",
    "HypersphericalUniform",
    "sphere",
    "TextHead",
    "HeadConfig",
    "AsymVLMLoss",
    "log_likelihood",
    "positives_from_ids",
    "symmetric_infonce",
    "parameter_groups",
    "log_bessel_iv",
    "bessel_ratio",
    "vmf_log_normalizer",
    "load_encoder",
    "FrozenEncoder",
    "embed_dataset",
    "write_cache",
    "EmbeddingCache",
    "AsymVLM",
    "ImageIndex",
    "TextIndex",
    "SearchResult",
    "zero_shot_classify",
]
