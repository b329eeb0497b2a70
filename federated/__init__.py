"""asymvlm.federated: one FedOpt core, federated LoRA rounds and server optimizers (``asymvlm-federate``).

* :mod:`asymvlm.federated.core` — the core shared with merging: ``Params``, streaming aggregators
  (weighted mean, median, trimmed mean, Krum, ...), pure server transforms (``chain``,
  ``scale_by_adam``, ...), ``Recipe`` and ``server_update`` (the one server step), differential
  privacy (``DifferentialPrivacy``) and exact LoRA aggregation (``LoraLayers``, ``aggregate_lora``);
* :mod:`asymvlm.federated.recipes` — the named algorithms (FedAvg, FedAdam, FedYogi, FedAdagrad,
  AdaFedAdam, q-FFL, GHBM, FedProx, FedAvgM, median, trimmed mean, Krum) with their papers and
  declared options (``make_recipe``);
* :mod:`asymvlm.federated.config` — ``FederatedArguments``, ``RecipeArguments``;
* :mod:`asymvlm.federated.data` — partitioned client data; :mod:`asymvlm.federated.partition` —
  heterogeneity partitioners; :mod:`asymvlm.federated.fed3r` — Fed3R;
* :mod:`asymvlm.federated.client` — local training; :mod:`asymvlm.federated.rounds` — the rounds
  (``run_federated``); :mod:`asymvlm.federated.checkpoint` — server state, resume, the saved model;
* :mod:`asymvlm.federated.personal` — personalised FL (FedPer, LG-FedAvg, FedSA-LoRA, FedRep,
  Ditto, pFedMe, local fine-tuning, concentration routing; ``PERSONALIZERS``) with
  :mod:`asymvlm.federated.personal_run` (per-client evaluation) and
  :mod:`asymvlm.federated.personal_store` (client-side state); :mod:`asymvlm.federated.clustered`
  — clustered FL (IFCA, CFL; ``CLUSTERERS``);
* at scale: :mod:`asymvlm.federated.vectorized` — clients trained together as one batched
  computation, streamed aggregation; :mod:`asymvlm.federated.compression` and
  :mod:`asymvlm.federated.uploads` — compressed uploads with error feedback;
  :mod:`asymvlm.federated.asynchronous` — FedBuff over simulated latencies (every in-flight
  update held in memory); :mod:`asymvlm.federated.participation` — availability models, FedAU and
  FedStale; :mod:`asymvlm.federated.sampling` — who takes part in a round.

The names below import lazily: ``from asymvlm.federated import WeightedMean, make_recipe`` does
not import peft or transformers.
"""

from asymvlm.lazy import lazy_exports

_EXPORTS = {
    "Params": "asymvlm.federated.core",
    "AggregateResult": "asymvlm.federated.core",
    "Aggregator": "asymvlm.federated.core",
    "WeightedMean": "asymvlm.federated.core",
    "Sum": "asymvlm.federated.core",
    "ClippedMean": "asymvlm.federated.core",
    "CoordinateMedian": "asymvlm.federated.core",
    "TrimmedMean": "asymvlm.federated.core",
    "Krum": "asymvlm.federated.core",
    "Transform": "asymvlm.federated.core",
    "chain": "asymvlm.federated.core",
    "identity": "asymvlm.federated.core",
    "scale": "asymvlm.federated.core",
    "trace": "asymvlm.federated.core",
    "scale_by_adam": "asymvlm.federated.core",
    "scale_by_yogi": "asymvlm.federated.core",
    "scale_by_adagrad": "asymvlm.federated.core",
    "apply_updates": "asymvlm.federated.core",
    "Recipe": "asymvlm.federated.core",
    "server_update": "asymvlm.federated.core",
    "DifferentialPrivacy": "asymvlm.federated.core",
    "DPCompositionError": "asymvlm.federated.core",
    "LoraLayers": "asymvlm.federated.core",
    "aggregate_lora": "asymvlm.federated.core",
    "LORA_MODES": "asymvlm.federated.core",
    "ClientUpdateError": "asymvlm.federated.core",
    "RECIPES": "asymvlm.federated.recipes",
    "DP_RECIPES": "asymvlm.federated.recipes",
    "make_recipe": "asymvlm.federated.recipes",
    "FederatedArguments": "asymvlm.federated.config",
    "RecipeArguments": "asymvlm.federated.config",
    "FederatedData": "asymvlm.federated.data",
    "get_federated_data": "asymvlm.federated.data",
    "run_federated": "asymvlm.federated.rounds",
    "Federation": "asymvlm.federated.rounds",
    "ServerState": "asymvlm.federated.checkpoint",
    "load_server_state": "asymvlm.federated.checkpoint",
    "save_server_state": "asymvlm.federated.checkpoint",
    "save_federated_model": "asymvlm.federated.checkpoint",
    "ClientOptions": "asymvlm.federated.client",
    "build_client_model": "asymvlm.federated.client",
    "client_update": "asymvlm.federated.client",
    "PARTITIONER_REGISTRY": "asymvlm.federated.partition",
    "PERSONALIZERS": "asymvlm.federated.personal",
    "make_personalizer": "asymvlm.federated.personal",
    "CLUSTERERS": "asymvlm.federated.clustered",
    "adjusted_rand_index": "asymvlm.federated.clustered",
    "client_statistics": "asymvlm.federated.fed3r",
    "solve": "asymvlm.federated.fed3r",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
