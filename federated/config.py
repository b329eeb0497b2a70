"""``asymvlm-federate``'s configuration: the federation (:class:`FederatedArguments`) and the
recipe's options (:class:`RecipeArguments`).

:class:`RecipeArguments` is generated from the recipe registry: one field per declared option of
any recipe (``server_lr``, ``server_beta1``, ``qffl_q``, ``krum_num_malicious``, ...), every one
``None`` by default, meaning "the recipe's own default". Only options that are set reach
:func:`~asymvlm.federated.recipes.make_recipe`, which rejects those the chosen recipe does not
declare, so ``--recipe fedavg --qffl_q 0.1`` is an error and ``--recipe fedadam`` runs at
FedAdam's server learning rate, not at another recipe's.

Example:
    >>> fed = FederatedArguments(recipe="fedadam", rounds=3)
    >>> recipe_options(RecipeArguments(server_lr=0.01))
    {'server_lr': 0.01}
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from asymvlm.config import ConfigError, LoraArguments, RunArguments, check_fields, command_default
from asymvlm.federated import asynchronous, participation
from asymvlm.federated.attacks import ATTACKS
from asymvlm.federated.client import LOCAL_OPTIMIZERS
from asymvlm.federated.clustered import CLUSTERERS
from asymvlm.federated.compression import build_codec
from asymvlm.federated.core import LORA_MODES
from asymvlm.federated.partition import PARTITIONER_REGISTRY
from asymvlm.federated.personal import PERSONALIZERS
from asymvlm.federated.recipes import RECIPES

__all__ = [
    "FederatedArguments",
    "RecipeArguments",
    "recipe_options",
    "ATTACKS",
    "RUN_OPTIONS",
    "RESUMABLE_CHANGES",
    "RUN_OUTPUTS",
]

RUN_OPTIONS = ("local_lr",)  # recipe options the run supplies itself (AdaFedAdam's and q-FFL's eta_l)
# what may change between a run and its --resume (everything else must match the checkpoint's config)
RESUMABLE_CHANGES = ("rounds", "diagnostics", "heterogeneity_report", *RunArguments.RESUMABLE)  # these only observe
RUN_OUTPUTS = (
    "checkpoints", "metrics.jsonl", "model", "clients", "clients.json", "clients.png", "diagnostics.png",
    "heterogeneity.json", "heterogeneity.png",
)  # fmt: skip  # what a run writes into output_dir
# a client SGD step larger than this on a unit-sphere head only diverges (the defaults are 0.05-0.5)
MAX_LOCAL_LR = 100.0


@dataclass(frozen=True)
class FederatedArguments(LoraArguments, RunArguments):
    """Everything about the federation (the data come from :class:`asymvlm.config.DataArguments`,
    the head from :class:`asymvlm.heads.HeadConfig`, the recipe's options from
    :class:`RecipeArguments`). What is trained and the LoRA adapter are
    :class:`~asymvlm.config.LoraArguments`, the run control :class:`~asymvlm.config.RunArguments`
    (``eval_every`` counts rounds; its default here is 5), as in ``asymvlm-train``."""

    output_dir: str = command_default(RunArguments, "output_dir", "runs/federated")
    eval_every: int = command_default(RunArguments, "eval_every", 5)

    recipe: Literal[tuple(RECIPES)] = field(  # type: ignore[valid-type]
        default="fedavg", metadata={"help": "Algorithm (asymvlm-federate --list-recipes shows each one's options)."}
    )
    rounds: int = field(default=20, metadata={"help": "Communication rounds."})
    num_clients: int = field(default=8, metadata={"help": "Simulated clients."})
    clients_per_round: int = field(default=0, metadata={"help": "Clients sampled per round (0: use client_fraction)."})
    client_fraction: float = field(default=1.0, metadata={"help": "Fraction of clients sampled per round."})
    min_clients: int = field(
        default=1,
        metadata={
            "help": "Fewest valid updates to make a server step (must stay 1 under DP: every round is released)."
        },
    )
    dropout_prob: float = field(default=0.0, metadata={"help": "Probability that a sampled client drops out."})
    straggler_deadline: float = field(
        default=0.0,
        metadata={
            "help": "Deadline in local steps of a nominal client; client speeds ~ lognormal(0, 0.5); slower clients "
            "miss the round (0 = no deadline)."
        },
    )
    partition: Literal[tuple(PARTITIONER_REGISTRY)] = field(  # type: ignore[valid-type]
        default="iid", metadata={"help": "How the images are split among the clients."}
    )
    partition_column: str = field(
        default="caption_style",
        metadata={
            "help": "Per-image column for dirichlet/domain (ShapeWorld: shape, colour, size, position, "
            "caption_style, visual_style)."
        },
    )
    partition_alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration (dirichlet, quantity)."})
    min_client_size: int = field(default=4, metadata={"help": "Fewest images per client."})
    partition_options: str = field(
        default="",
        metadata={
            "help": "The partitioner's options as a JSON/YAML mapping (a mapping in a YAML config), checked against "
            'what it declares (PARTITIONER_REGISTRY.describe()), e.g. \'{"column": "image_embedding", '
            '"clusters": 8}\' for --partition embedding; column/alpha/min_size given here replace '
            "partition_column/partition_alpha/min_client_size, which must then stay at their defaults."
        },
    )
    heterogeneity_report: bool = field(
        default=False,
        metadata={
            "help": "Write the partition's heterogeneity report into output_dir: heterogeneity.json (sizes, "
            "histograms, Jensen-Shannon divergences to the population) and heterogeneity.png."
        },
    )
    temporal_column: str = field(
        default="",
        metadata={
            "help": "Temporal skew (asymvlm.federated.temporal): cut every client's images in two phases by this "
            "column (labels, or vectors clustered by k-means, e.g. image_embedding); clients move to phase 1 at "
            "temporal_switch ('' = off)."
        },
    )
    temporal_switch: int = field(
        default=0, metadata={"help": "The round (1-based) from which clients train on their phase-1 data."}
    )
    client_test_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Hold out this fraction of every client's images (at least one) as the client's own test split "
            "(its own distribution); evaluation rounds then report per-client R@1 and uncertainty quality of the "
            "global and the personal models (0 = off)."
        },
    )
    personalize: Literal[tuple(PERSONALIZERS)] = field(  # type: ignore[valid-type]
        default="none",
        metadata={"help": "Personalisation method (asymvlm-federate --list_personalizers shows each one's options)."},
    )
    personalize_options: str = field(
        default="",
        metadata={"help": "The personalisation method's options as a JSON/YAML mapping, checked against its entry."},
    )
    cluster: Literal[("none", *CLUSTERERS)] = field(  # type: ignore[valid-type]
        default="none",
        metadata={
            "help": "Clustered (ifca, cfl) or multi-task (fedem, mocha) federated learning: the server keeps several "
            "models (asymvlm-federate --list_personalizers shows each method's options)."
        },
    )
    cluster_options: str = field(
        default="",
        metadata={"help": "The clustering method's options as a JSON/YAML mapping, checked against its entry."},
    )
    client_batch: str = field(
        default="auto",
        metadata={
            "help": "Clients trained together as one batched computation (asymvlm.federated.vectorized): 'auto' "
            "(every client of the round where the clients allow it, in chunks within client_memory_mb; one by one "
            "otherwise), a number N (at most N at once) or 1 (one by one, the sequential loop)."
        },
    )
    client_memory_mb: int = field(
        default=1024,
        metadata={"help": "Memory budget (MiB) of one chunk of vectorised clients (client_batch auto or N)."},
    )
    compression: str = field(
        default="none",
        metadata={
            "help": "Client upload encoders, '+'-joined and applied left to right (asymvlm.federated.compression), "
            "e.g. 'topk+int8'; the server decodes; 'none' sends float32 as trained."
        },
    )
    compression_options: str = field(
        default="",
        metadata={"help": "Each encoder's options as a JSON/YAML mapping {encoder: {option: value}}, checked."},
    )
    availability: str = field(
        default="uniform",
        metadata={
            "help": "Client availability model (asymvlm.federated.participation): 'uniform' samples "
            "clients_per_round uniformly; others give each client its own availability."
        },
    )
    availability_options: str = field(
        default="", metadata={"help": "The availability model's options as a JSON/YAML mapping, checked."}
    )
    participation_correction: str = field(
        default="none",
        metadata={
            "help": "Correct the aggregate for unknown or skewed participation (asymvlm.federated.participation): "
            "'none', or a registered method (e.g. fedau, fedstale)."
        },
    )
    participation_options: str = field(
        default="", metadata={"help": "The participation correction's options as a JSON/YAML mapping, checked."}
    )
    asynchronous: str = field(
        default="none",
        metadata={
            "help": "Asynchronous aggregation with simulated client latencies (asymvlm.federated.asynchronous): "
            "'none' (synchronous rounds) or 'fedbuff'; a 'round' is then one server step."
        },
    )
    async_options: str = field(
        default="",
        metadata={"help": "The asynchronous mode's options (buffer, concurrency, latencies) as a JSON/YAML mapping."},
    )
    local_steps: int = field(default=10, metadata={"help": "Local SGD steps per round."})
    local_lr: float = field(default=0.05, metadata={"help": f"Client learning rate eta_l (in (0, {MAX_LOCAL_LR:g}])."})
    local_batch_size: int = field(default=256, metadata={"help": "Client batch (captions)."})
    local_momentum: float = field(default=0.0, metadata={"help": "Client SGD momentum, in [0, 1)."})
    local_optimizer: Literal[LOCAL_OPTIMIZERS] = field(  # type: ignore[valid-type]
        default="sgd",
        metadata={"help": "The clients' local optimizer: sgd (with local_momentum) or adamw (fresh state each round)."},
    )
    local_weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW's decoupled weight decay of the clients (not the temperature)."}
    )
    lora_mode: Literal[tuple(LORA_MODES)] = field(  # type: ignore[valid-type]
        default="residual",
        metadata={
            "help": "LoRA aggregation: factors (FedIT), frozen_a (FFA-LoRA), stack (FLoRA), residual (FedEx-LoRA), svd."
        },
    )
    fairness_batches: int = field(default=2, metadata={"help": "Batches per client for the fairness report."})
    diagnostics: bool = field(
        default=False,
        metadata={
            "help": "Log drift diagnostics every round in metrics.jsonl (asymvlm.federated.diagnostics): each sampled "
            "client's drift ||theta_k - theta||, the cosines between client deltas, and the gradient dissimilarity "
            "G^2 at the round's global model (one gradient per sampled client; not under DP)."
        },
    )
    attack: Literal[tuple(ATTACKS)] = field(  # type: ignore[valid-type]
        default="none",
        metadata={"help": "Simulated Byzantine clients (robustness experiments; asymvlm.federated.attacks)."},
    )
    malicious_fraction: float = field(default=0.0, metadata={"help": "Fraction of clients that attack."})
    attack_scale: float = field(
        default=10.0, metadata={"help": "Factor of the 'scale' attack; noise norm / honest norm of 'gaussian'."}
    )
    dp_noise_multiplier: float = field(
        default=0.0,
        metadata={
            "help": "Differential privacy (0 = off): Gaussian noise of std multiplier * dp_max_norm on the sum of the "
            "clipped client releases; clients are Poisson-sampled; needs opacus for the accountant."
        },
    )
    dp_max_norm: float = field(default=1.0, metadata={"help": "Per-client joint clipping norm of everything it sends."})
    dp_delta: float = field(default=1e-5, metadata={"help": "Target delta of the (epsilon, delta) accountant."})
    dp_insecure_seed: Optional[int] = field(  # noqa: UP045 (HfArgumentParser reads typing.Optional)
        default=None,
        metadata={
            "help": "TESTS ONLY: seed the DP noise so runs repeat (anyone with the seed can remove the noise); "
            "the run's reports are marked INSECURE."
        },
    )

    def __post_init__(self) -> None:
        for name in _OPTION_FIELDS:
            if isinstance(getattr(self, name), dict):  # a mapping from YAML or Python: kept as canonical JSON
                object.__setattr__(self, name, _options_json(getattr(self, name), name))
        check_fields(self)
        if self.partition_options:
            PARTITIONER_REGISTRY.build(self.partition, **self.partition_kwargs())  # unknown keys fail here
        PERSONALIZERS.resolve(self.personalize, self.personalizer_options())
        if self.cluster != "none":
            CLUSTERERS.resolve(self.cluster, self.cluster_kwargs())
        elif self.cluster_options:
            raise ConfigError("cluster_options is given but cluster is 'none'")
        self._check_lora()
        self._check_run()
        self._check_scale()
        for name in ("rounds", "num_clients", "local_steps", "min_clients", "local_batch_size", "min_client_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.client_fraction <= 1 or not 0 <= self.dropout_prob < 1 or not 0 <= self.malicious_fraction < 1:
            raise ConfigError("need 0 < client_fraction <= 1, 0 <= dropout_prob < 1, 0 <= malicious_fraction < 1")
        if self.dp_noise_multiplier < 0 or not math.isfinite(self.dp_noise_multiplier):
            raise ConfigError(f"dp_noise_multiplier must be >= 0 (0 = off), got {self.dp_noise_multiplier}")
        if not (self.dp_max_norm > 0 and math.isfinite(self.dp_max_norm)):
            raise ConfigError(f"dp_max_norm must be > 0, got {self.dp_max_norm}")
        if self.clients_per_round < 0 or self.clients_per_round > self.num_clients:
            raise ConfigError(
                f"clients_per_round must be in [0, num_clients={self.num_clients}] (0: use client_fraction), "
                f"got {self.clients_per_round}"
            )
        per_round = round(self.sample_rate * self.num_clients)
        if self.min_clients > (self.num_clients if self.dp_noise_multiplier > 0 else per_round):
            raise ConfigError(
                f"min_clients={self.min_clients} exceeds the {per_round} clients sampled per round: every round "
                "would be skipped"
            )
        self._check_ranges()

    def _check_scale(self) -> None:
        """The options of the vectorised, compressed, asynchronous and participation-corrected runs,
        each checked by its own module's registry (an unknown name or option is a ConfigError)."""
        participation.check_options(self)
        asynchronous.check_options(self)
        frozen = ["the frozen LoRA A factors"] if self.trainable != "head" and self.lora_mode == "frozen_a" else []
        build_codec(self.compression, self.options_of("compression_options"), frozen_keys=frozen)  # names checked

    def _check_ranges(self) -> None:
        """Every number in its range (a value outside is a ConfigError naming the option)."""
        if self.client_batch != "auto" and not (self.client_batch.isdigit() and int(self.client_batch) >= 1):
            raise ConfigError(f"client_batch must be 'auto' or a number >= 1, got {self.client_batch!r}")
        if self.client_memory_mb < 1:
            raise ConfigError(f"client_memory_mb must be >= 1, got {self.client_memory_mb}")
        if bool(self.temporal_column) != (self.temporal_switch > 0):
            raise ConfigError("temporal_column and temporal_switch >= 1 go together (temporal skew), or neither")
        if not 0 <= self.client_test_fraction < 1:  # NaN fails too
            raise ConfigError(f"client_test_fraction must be in [0, 1), got {self.client_test_fraction}")
        personal = self.personalize != "none" or self.cluster != "none" or self.client_test_fraction > 0
        if personal and self.dp_noise_multiplier > 0:
            raise ConfigError(
                "personalize, cluster and client_test_fraction cannot run under differential privacy yet: personal "
                "and cluster models and per-client test figures are functions of private data outside the mechanism"
            )
        if self.personalize != "none" and self.cluster != "none":
            raise ConfigError("choose personalize or cluster, not both (a personalised clustered run is not built yet)")
        if self.fairness_batches < 1:
            raise ConfigError(f"fairness_batches must be >= 1, got {self.fairness_batches}")
        if not (0 < self.local_lr <= MAX_LOCAL_LR):  # NaN fails too
            raise ConfigError(f"local_lr must be in (0, {MAX_LOCAL_LR:g}], got {self.local_lr}")
        if not 0 <= self.local_momentum < 1:
            raise ConfigError(f"local_momentum must be in [0, 1), got {self.local_momentum}")
        if not (self.local_weight_decay >= 0 and math.isfinite(self.local_weight_decay)):
            raise ConfigError(f"local_weight_decay must be >= 0 and finite, got {self.local_weight_decay}")
        if self.local_optimizer != "adamw" and (self.local_weight_decay > 0):
            raise ConfigError("local_weight_decay is AdamW's: set local_optimizer adamw or leave it at 0")
        if self.local_optimizer == "adamw" and self.local_momentum > 0:
            raise ConfigError("local_momentum is SGD's: AdamW has its own moments (leave local_momentum at 0)")
        if not math.isfinite(self.attack_scale):
            raise ConfigError(f"attack_scale must be a finite number (negative flips), got {self.attack_scale}")
        if not (self.partition_alpha > 0 and math.isfinite(self.partition_alpha)):
            raise ConfigError(f"partition_alpha must be > 0 and finite, got {self.partition_alpha}")
        if not (self.straggler_deadline >= 0 and math.isfinite(self.straggler_deadline)):
            raise ConfigError(
                f"straggler_deadline must be >= 0 and finite (0: no deadline), got {self.straggler_deadline}"
            )
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"dp_delta must be in (0, 1), got {self.dp_delta}")
        if self.dp_insecure_seed is not None and self.dp_insecure_seed < 0:
            raise ConfigError(f"dp_insecure_seed must be >= 0, got {self.dp_insecure_seed}")
        if self.dp_noise_multiplier > 0 and self.diagnostics:
            raise ConfigError(
                "diagnostics cannot be logged under differential privacy: per-client drift, cosines and gradients are "
                "functions of private data outside the mechanism"
            )
        if self.dp_noise_multiplier > 0 and self.min_clients != 1:
            raise ConfigError(
                f"min_clients={self.min_clients} cannot skip rounds under differential privacy: every round is "
                "released (the noise alone when too few clients are sampled), since a skip would depend on who takes "
                "part; leave min_clients at 1"
            )

    def partition_kwargs(self) -> dict[str, Any]:
        """The options the chosen partitioner gets: ``partition_column``, ``partition_alpha`` and
        ``min_client_size`` (as ``column``, ``alpha``, ``min_size``) where it declares them, then
        ``partition_options``.

        Raises:
            ConfigError: ``partition_options`` is not a mapping, or sets a key whose flag was also
                changed from its default (given both ways).

        Example:
            >>> fed = FederatedArguments(partition="embedding", partition_options='{"column": "v", "clusters": 3}')
            >>> fed.partition_kwargs()
            {'column': 'v', 'alpha': 0.5, 'min_size': 4, 'clusters': 3}
        """
        options = _options_mapping(self.partition_options, "partition_options")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        declared = PARTITIONER_REGISTRY.entry(self.partition).param_names
        out = {}
        for key, flag in _PARTITION_FLAGS.items():
            if key in options and getattr(self, flag) != defaults[flag]:
                raise ConfigError(
                    f"partition option {key!r} is given both by --{flag} and by --partition_options; give it once"
                )
            if key in declared:
                own = PARTITIONER_REGISTRY.entry(self.partition).param(key).default
                # a flag left at its default gives way to the partitioner's own alpha (feature_skew and
                # concept_shift: 0.1); min_size keeps the run's default; column is required where declared
                at_default = getattr(self, flag) == defaults[flag]
                out[key] = own if key == "alpha" and at_default and own is not None else getattr(self, flag)
        return {**out, **options}

    def options_of(self, name: str) -> dict[str, Any]:
        """The JSON/YAML option field ``name`` (e.g. ``"compression_options"``) as a dict."""
        return _options_mapping(getattr(self, name), name)

    @property
    def client_batch_size(self) -> int | None:
        """``client_batch`` as a number: None for ``auto``."""
        return None if self.client_batch == "auto" else int(self.client_batch)

    def cluster_kwargs(self) -> dict[str, Any]:
        """``cluster_options`` as a dict (checked by :data:`~asymvlm.federated.clustered.CLUSTERERS`)."""
        return _options_mapping(self.cluster_options, "cluster_options")

    def personalizer_options(self) -> dict[str, Any]:
        """``personalize_options`` as a dict (checked by :data:`~asymvlm.federated.personal.PERSONALIZERS`)."""
        return _options_mapping(self.personalize_options, "personalize_options")

    @property
    def sample_rate(self) -> float:
        """The fraction of clients sampled per round."""
        m = self.clients_per_round or max(1, int(round(self.client_fraction * self.num_clients)))
        return min(m, self.num_clients) / self.num_clients


_OPTION_FIELDS = (
    "partition_options", "personalize_options", "cluster_options", "compression_options", "availability_options",
    "participation_options", "async_options",
)  # fmt: skip
_PARTITION_FLAGS = {"column": "partition_column", "alpha": "partition_alpha", "min_size": "min_client_size"}


def _options_json(options: dict[str, Any], name: str = "partition_options") -> str:
    if not all(isinstance(k, str) for k in options):
        raise ConfigError(f"{name} keys must be option names (strings), got {sorted(map(str, options))}")
    return json.dumps(options, sort_keys=True) if options else ""


def _options_mapping(text: str, name: str = "partition_options") -> dict[str, Any]:
    """``name``'s text (JSON or YAML; empty: none) as a dict."""
    if not text.strip():
        return {}
    import yaml

    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as err:
        raise ConfigError(f"{name} is not valid JSON/YAML: {str(err).splitlines()[0]}") from None
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{name} must be a mapping of option names to values, got {text!r}")
    return value


def _recipe_fields() -> list[tuple[str, Any, Any]]:
    """One optional field per declared recipe option (``RECIPES.options()``: types must agree across
    recipes), the options the run supplies itself (:data:`RUN_OPTIONS`) left out."""
    out = []
    for pname, (p, users) in RECIPES.options().items():
        if pname in RUN_OPTIONS:
            continue
        help_ = f"{p.help} Recipes: {', '.join(users)} (default: the recipe's own)."
        out.append((pname, Optional[p.type], field(default=None, metadata={"help": help_})))  # noqa: UP045
    return out


RecipeArguments = dataclasses.make_dataclass(
    "RecipeArguments",
    _recipe_fields(),
    frozen=True,
    namespace={"__doc__": "Options of the recipe (each None = the recipe's default; see --list-recipes)."},
)
RecipeArguments.__module__ = __name__


def recipe_options(args: Any) -> dict[str, Any]:
    """The options of a :class:`RecipeArguments` that are set."""
    return {k: v for k, v in dataclasses.asdict(args).items() if v is not None}
