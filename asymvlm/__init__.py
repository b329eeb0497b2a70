"""asymvlm: calibrated uncertainty for frozen vision-language models (AsymVLM, NeurIPS 2025).

Frozen image embeddings stay deterministic; each text gets a distribution on the unit sphere
(von Mises–Fisher or Power Spherical) from a small head trained with InfoNCE over
log-likelihoods. See README.md for a tour.
"""

from asymvlm import toyclip as _toyclip  # noqa: F401  (registers the toy CLIP's pretrained tag)
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
