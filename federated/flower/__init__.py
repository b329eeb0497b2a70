"""asymvlm on Flower's deployment engine (``pip install 'asymvlm[flower]'``): a ServerApp whose
strategy is asymvlm's one server step, and a ClientApp that runs asymvlm's client update on the
node's own data.

* :mod:`asymvlm.federated.flower.config` — the run config (``asymvlm-federate``'s keys, dashes or
  underscores, plus the ServerApp's own), its limits, and the messages' shared keys;
* :mod:`asymvlm.federated.flower.client` — the ClientApp, :data:`client_app`
  (``asymvlm.federated.flower.client:client_app``, what each SuperNode runs);
* :mod:`asymvlm.federated.flower.replies` — the checks of a node's replies (every field untrusted);
* :mod:`asymvlm.federated.flower.server` — the ServerApp, :data:`server_app`
  (``asymvlm.federated.flower.server:server_app``, what the SuperLink host runs), its rounds
  (:func:`run_flower_server`) and Flower's SecAgg+ rounds.

The harnesses that drive these apps (an in-process grid, a loopback deployment) are in
:mod:`asymvlm.testing`. The names below import lazily: ``import asymvlm.federated.flower`` does not
import Flower; using one of them does.
"""

from asymvlm.lazy import lazy_exports

_EXPORTS = {
    "server_app": "asymvlm.federated.flower.server",
    "run_flower_server": "asymvlm.federated.flower.server",
    "check_secure_aggregation": "asymvlm.federated.flower.server",
    "secagg_error_bound": "asymvlm.federated.flower.server",
    "FederationError": "asymvlm.federated.flower.server",
    "client_app": "asymvlm.federated.flower.client",
    "parse_run_config": "asymvlm.federated.flower.config",
    "server_options": "asymvlm.federated.flower.config",
    "check_head_size": "asymvlm.federated.flower.config",
    "ROUNDS_ALIAS": "asymvlm.federated.flower.config",
    "SERVER_KEYS": "asymvlm.federated.flower.config",
    "MAX_REPORTED": "asymvlm.federated.flower.replies",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
