"""uvicorn's h11 protocol with a deadline for the request head (``asymvlm-serve --head_timeout_s``).

uvicorn 0.x times out idle keep-alive connections only, and any byte resets that timer: a client
that opens a connection and trickles its request head a byte at a time held it forever. Here a
connection whose request head has not arrived within ``head_timeout_s`` of the connection opening,
or of the previous response's end, is closed. A request under way is left alone: its body has the
app's own deadline (``ServeConfig.read_timeout_s``, a 408).

Importing this module imports uvicorn (``asymvlm-serve`` only).
"""

from __future__ import annotations

import json
import os
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["SlowClientH11Protocol", "slow_client_protocol", "DEFAULT_HEAD_TIMEOUT_S"]

DEFAULT_HEAD_TIMEOUT_S = 10.0


def _from_environment() -> float:
    """``--head_timeout_s`` of the parent ``asymvlm-serve`` (worker processes: ``--workers > 1``)."""
    raw = os.environ.get("ASYMVLM_SERVE_ARGS")  # asymvlm.serve.cli.ENV_ARGS
    try:
        return float(json.loads(raw).get("head_timeout_s", DEFAULT_HEAD_TIMEOUT_S)) if raw else DEFAULT_HEAD_TIMEOUT_S
    except (ValueError, TypeError, AttributeError):
        return DEFAULT_HEAD_TIMEOUT_S


class SlowClientH11Protocol(H11Protocol):
    """:class:`H11Protocol` closing connections whose request head is late (see the module docstring)."""

    head_timeout_s: float = _from_environment()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()  # between requests only: a request under way is the app's

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)


def slow_client_protocol(head_timeout_s: float) -> type[SlowClientH11Protocol]:
    """:class:`SlowClientH11Protocol` with this head deadline (seconds)."""
    return type("SlowClientH11Protocol", (SlowClientH11Protocol,), {"head_timeout_s": float(head_timeout_s)})
