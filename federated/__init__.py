"""federated: one FedOpt core, federated LoRA rounds and server optimizers (``asymvlm-federate``).

* :mod:`federated.core` — ``Params``, streaming aggregators (weighted mean, median, trimmed mean,
  Krum, ...), pure server transforms (``chain``, ``scale_by_adam``, ...), ``apply_updates``;
* :mod:`federated.recipes` — the named algorithms (FedAvg, FedAdam, FedYogi, FedAdagrad,
  AdaFedAdam, q-FFL, GHBM, FedProx, FedAvgM, ...) with their papers;
* :mod:`federated.lora` — exact LoRA aggregation modes (factors, frozen_a, stack, residual, svd);
* :mod:`federated.partition` — heterogeneity partitioners; :mod:`federated.fed3r` — Fed3R;
* :mod:`federated.client`, :mod:`federated.simulation` — local training, rounds, checkpoints,
  resume; :mod:`federated.cli` — ``asymvlm-federate``.
"""

__all__: list[str] = []
