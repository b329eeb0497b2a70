"""federated: one FedOpt core, federated LoRA rounds and server optimizers (``asymvlm-federate``).

* :mod:`asymvlm.federated.core` — ``Params``, streaming aggregators (weighted mean, median, trimmed mean,
  Krum, ...), pure server transforms (``chain``, ``scale_by_adam``, ...), ``apply_updates``;
* :mod:`asymvlm.federated.recipes` — the named algorithms (FedAvg, FedAdam, FedYogi, FedAdagrad,
  AdaFedAdam, q-FFL, GHBM, FedProx, FedAvgM, ...) with their papers;
* :mod:`asymvlm.federated.lora` — exact LoRA aggregation modes (factors, frozen_a, stack, residual, svd);
* :mod:`asymvlm.federated.partition` — heterogeneity partitioners; :mod:`asymvlm.federated.fed3r` — Fed3R;
* :mod:`asymvlm.federated.client`, :mod:`asymvlm.federated.simulation` — local training, rounds, checkpoints,
  resume; :mod:`asymvlm.federated.cli` — ``asymvlm-federate``.
"""

__all__: list[str] = []
