"""The checks of a node's replies, as the ServerApp reads them: every field of every reply is
untrusted. A malformed field is a :class:`~asymvlm.errors.ClientUpdateError` naming it; the server
leaves that client out (of the round, the run or the fairness report) and records the reason.

Example:
    >>> shorten("x" * 500)[-5:], len(shorten("x" * 500))
    ('xx...', 300)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Message

from asymvlm.errors import ClientUpdateError
from asymvlm.federated.flower.config import MAX_EXAMPLES, from_arrays
from asymvlm.heads import MAX_WIDTH
from asymvlm.io import is_json_number

__all__ = [
    "Hello",
    "handshake_reply",
    "train_reply",
    "loss_reply",
    "own_test_reply",
    "group_train_reply",
    "shorten",
    "MAX_REASON",
    "MAX_REPORTED",
    "OWN_TEST_MODELS",
]

MAX_REASON = 300  # characters of a recorded reason (a node's own text is part of some)


def shorten(text: Any, limit: int = MAX_REASON) -> str:
    """``text`` on one line, cut to ``limit`` characters (ending in ``...`` when cut): a recorded reason."""
    text = str(text).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any) -> str:
    return shorten(repr(value), 40)


def _metrics(reply: Message) -> dict[str, Any]:
    record = reply.content.metric_records.get("metrics")
    if record is None:
        raise ClientUpdateError("no 'metrics' record (a MetricRecord) in the reply")
    return dict(record)


def _integer(m: Mapping[str, Any], key: str, low: int, high: int) -> int:
    v = m.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ClientUpdateError(f"{key} must be an integer in [{low}, {high}], got {_show(v)}")
    return int(v)


# A training statistic a client reports (its loss, its gradient's norm) above this is not one of a
# head on unit embeddings but a diverged or lying client: rejected. q-FFL and AdaFedAdam weight
# clients by these reports, so within the bound a client still chooses its own weight (documented).
MAX_REPORTED = 1e6


def _loss(m: Mapping[str, Any], key: str, *, positive: bool = False) -> float | None:
    """A reported loss or norm (None when absent): a finite number >= 0 (> 0 with ``positive``) and at
    most :data:`MAX_REPORTED`."""
    if key not in m:
        return None
    v = m[key]
    try:
        ok = is_json_number(v) and math.isfinite(float(v)) and (v > 0 if positive else v >= 0) and v <= MAX_REPORTED
    except OverflowError:  # an int beyond float's range
        ok = False
    if not ok:
        raise ClientUpdateError(
            f"{key} must be a finite number {'>' if positive else '>='} 0 and <= {MAX_REPORTED:g}, got {_show(v)}"
        )
    return float(v)


def _own_partition(m: Mapping[str, Any], client: int) -> None:
    pid = m.get("partition-id")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid != client:
        raise ClientUpdateError(f"partition-id {_show(pid)} is not this node's ({client})")


@dataclass(frozen=True)
class Hello:
    """A node's checked handshake."""

    partition: int
    num_examples: int
    dim: int
    encoder: dict[str, Any]  # the node's cache's record of its encoder (spec, pretrained, fingerprint, dim)

    def data_key(self) -> tuple:
        """What nodes must agree on: the width and the encoder (by fingerprint, else by name)."""
        fp = self.encoder.get("fingerprint")
        return (self.dim, fp) if fp else (self.dim, None, self.encoder.get("spec"), self.encoder.get("pretrained"))

    def describe(self) -> str:
        fp = self.encoder.get("fingerprint")
        return shorten(
            f"{self.dim}-d embeddings, encoder {self.encoder.get('spec')!r} "
            f"{'fingerprint ' + str(fp)[:16] + '...' if fp else 'of unknown fingerprint'}",
            160,
        )


def handshake_reply(reply: Message, num_clients: int) -> Hello:
    """A node's handshake (partition, size, width, encoder), checked field by field."""
    m = _metrics(reply)
    pid = _integer(m, "partition-id", 0, num_clients - 1)
    n = _integer(m, "num-examples", 1, MAX_EXAMPLES)
    dim = _integer(m, "dim", 1, MAX_WIDTH)
    info = reply.content.config_records.get("info")
    if info is None:
        raise ClientUpdateError("no 'info' record (a ConfigRecord) in the handshake")
    fp, text = info.get("encoder-fingerprint"), info.get("encoder")
    source = None
    if isinstance(text, str) and len(text) <= 4096:
        try:
            source = json.loads(text)
        except (ValueError, RecursionError):
            source = None
    plain = str | int | float | bool | None
    if (
        not isinstance(source, dict)
        or len(source) > 32
        or not all(isinstance(k, str) and isinstance(v, plain) for k, v in source.items())
    ):
        raise ClientUpdateError(f"info's encoder must be a JSON object of plain values, got {_show(text)}")
    if not isinstance(fp, str) or fp != str(source.get("fingerprint") or ""):
        raise ClientUpdateError(f"info's encoder-fingerprint {_show(fp)} differs from its encoder record")
    if source.get("dim") is not None and source["dim"] != dim:
        raise ClientUpdateError(f"its encoder record says dim {_show(source['dim'])}, its metrics {dim}")
    return Hello(pid, n, dim, source)


def train_reply(reply: Message, client: int, num_examples: int, needs: Iterable[str]) -> Any:
    """A client's training reply as a :class:`~asymvlm.federated.client.ClientResult`, checked field
    by field. Its ``num-examples`` must be the handshake's: the weight is the handshake's count, and
    a client whose size changes mid-run is rejected (a liar could otherwise take the round's weight)."""
    from asymvlm.federated.client import ClientResult

    m = _metrics(reply)
    _own_partition(m, client)
    n = m.get("num-examples")
    if isinstance(n, bool) or not isinstance(n, int):
        raise ClientUpdateError(f"num-examples must be an integer, got {_show(n)}")
    if n != num_examples:
        raise ClientUpdateError(f"num-examples {n} is not the {num_examples} of its handshake")
    values = {key: _loss(m, key) for key in ("loss-before", "loss-after", "grad-norm")}
    for need, key in (("loss_before", "loss-before"), ("loss_initial", "loss-before"), ("grad_norm", "grad-norm")):
        if need in needs and values[key] is None:
            raise ClientUpdateError(f"no {key} in the reply (the recipe needs it)")
    delta = _delta(reply, "arrays")
    return ClientResult(client, delta, num_examples, values["loss-before"], values["loss-after"], values["grad-norm"])


def _delta(reply: Message, key: str) -> Any:
    record = reply.content.array_records.get(key)
    if record is None:
        raise ClientUpdateError(f"no {key!r} record (an ArrayRecord) in the reply")
    try:
        return from_arrays(record)
    except Exception as err:  # a malformed record: rejected like a bad delta
        raise ClientUpdateError(f"unreadable {key}: {type(err).__name__}: {err}") from None


def group_train_reply(reply: Message, client: int, num_examples: int, needs: Iterable[str], groups: int) -> list:
    """A multi-model client's reply (FedEM: one update per component, ``arrays-<m>``), checked
    like :func:`train_reply`: one :class:`~asymvlm.federated.client.ClientResult` per group."""
    first = reply.content.array_records.get("arrays-0")
    if first is None:
        raise ClientUpdateError("no 'arrays-0' record: a multi-model round replies with arrays-0 .. arrays-M-1")
    m = _metrics(reply)
    if m.get("groups") != groups or isinstance(m.get("groups"), bool):
        raise ClientUpdateError(f"groups must be {groups} (one update per server model), got {_show(m.get('groups'))}")
    from flwr.app import RecordDict

    results = []
    for j in range(groups):
        record = reply.content.array_records.get(f"arrays-{j}")
        if record is None:
            raise ClientUpdateError(f"no 'arrays-{j}' record in the reply")
        view = RecordDict({"arrays": record, "metrics": reply.content.metric_records["metrics"]})
        one = train_reply(_Reply(view), client, num_examples, needs)  # the metrics checked as for one update
        one.group = j
        results.append(one)
    return results


class _Reply:
    """A reply's content seen with one group's update as its ``arrays`` (what :func:`train_reply` reads)."""

    def __init__(self, content: Any):
        self.content = content


OWN_TEST_MODELS = ("global", "personal", "cluster")  # the models a client scores on its own test split


def own_test_reply(reply: Message) -> dict[str, dict[str, float]]:
    """A client's metrics on its own test split from its evaluate reply (``<model>.<metric>``
    numbers, model one of :data:`OWN_TEST_MODELS`), ``{model: {metric: value}}``, checked."""
    m = _metrics(reply)
    out: dict[str, dict[str, float]] = {}
    for key, value in m.items():
        if "." not in key:
            continue
        model, metric = key.split(".", 1)
        if model not in OWN_TEST_MODELS:
            raise ClientUpdateError(f"unknown model {model!r} in its test metrics (expected {OWN_TEST_MODELS})")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ClientUpdateError(f"test metric {key!r} must be a number, got {_show(value)}")
        out.setdefault(model, {})[metric] = float(value)
    if not out:
        raise ClientUpdateError("no test metrics in the reply (its own test split was asked for)")
    return out


def loss_reply(reply: Message, client: int, key: str, *, positive: bool = False) -> float:
    """A client's reported loss (the initial loss, the fairness report's), checked."""
    m = _metrics(reply)
    _own_partition(m, client)
    value = _loss(m, key, positive=positive)
    if value is None:
        raise ClientUpdateError(f"no {key} in the reply")
    return value
