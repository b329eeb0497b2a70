"""Harnesses for the tests and the benchmarks: public and documented, but no package feature
(nothing in the package imports this package except training's composition root).

* :mod:`asymvlm.testing.procs` — services on this machine's loopback: a free port
  (:func:`free_port`), waiting for a condition (:func:`wait_for`), killing a process with every
  process it started, by PID (:func:`kill_tree`);
* :mod:`asymvlm.testing.loopback` — ``asymvlm-serve`` on loopback (:class:`LoopbackServer`,
  :func:`serve_command`);
* :mod:`asymvlm.testing.grid` — :class:`LocalGrid`, a Flower grid that delivers a ServerApp's
  messages to ClientApps in this process (``pip install 'asymvlm[flower]'``);
* :mod:`asymvlm.testing.flower_deploy` — :class:`LoopbackDeployment`, a Flower deployment
  (``flower-superlink``, ``flower-supernode`` processes, ``flwr run``) on loopback, with
  :func:`make_certificates` for its TLS and :func:`toml_value` for its configs;
* :mod:`asymvlm.testing.fuzz` — a mutation fuzzer for every artefact asymvlm writes: build a small
  valid one, change one field, one tensor or one file at a time, load it the way the package does,
  and classify what happened (``tests/test_artifact_fuzz.py``, ``bench/fuzz_artifacts.py``).

The names below import lazily: ``from asymvlm.testing import free_port`` imports neither Flower nor
the HTTP client.

Example:
    >>> from asymvlm.testing import free_port
    >>> 1024 <= free_port() <= 65535
    True
"""

from asymvlm.lazy import lazy_exports

_EXPORTS = {
    "free_port": "asymvlm.testing.procs",
    "kill_tree": "asymvlm.testing.procs",
    "wait_for": "asymvlm.testing.procs",
    "LoopbackServer": "asymvlm.testing.loopback",
    "serve_command": "asymvlm.testing.loopback",
    "LocalGrid": "asymvlm.testing.grid",
    "LoopbackDeployment": "asymvlm.testing.flower_deploy",
    "make_certificates": "asymvlm.testing.flower_deploy",
    "toml_value": "asymvlm.testing.flower_deploy",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
