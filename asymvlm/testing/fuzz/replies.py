"""Flower replies as an artefact kind: one node's replies (handshake, initial loss, train,
evaluate) mutated on their way to the ServerApp, run over :class:`~asymvlm.testing.grid.LocalGrid`;
a reply is handled cleanly when the run names the node or records its rejection.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from .kinds import Kind, write_tiny_cache
from .mutations import EXTRA_KEY, HUGE_INT, is_number, mutate_tensor, negated, tensor_ops
from .outcomes import Mutation, first_difference, same

__all__ = ["FlowerKind", "mutate_reply", "FLOWER_NODE", "FLOWER_PARTITION"]


FLOWER_NODE, FLOWER_PARTITION = 2, 1  # the node whose replies are mutated, and the partition it holds


def _message_key(msg: Any) -> str:
    kind = msg.metadata.message_type
    if kind == "query":
        return "query.loss" if "arrays" in msg.content.array_records else "query.handshake"
    return kind


class _ReplyApp:
    """Wraps a ClientApp: records the replies of one node, or mutates them."""

    def __init__(self, app: Any, mutation: Mutation | None = None):
        self.app, self.mutation, self.record = app, mutation, {}

    def __call__(self, msg: Any, context: Any) -> Any:
        reply = self.app(msg, context)
        if reply.has_error():
            return reply
        key = _message_key(msg)
        self.record.setdefault(key, reply.content)
        if self.mutation is not None and self.mutation.file == key:
            from flwr.app import Message

            return Message(mutate_reply(self.mutation, reply.content), reply_to=msg)
        return reply


def _record_kind(rec: Any) -> str:
    from flwr.app import ArrayRecord, ConfigRecord

    return "arrays" if isinstance(rec, ArrayRecord) else "config" if isinstance(rec, ConfigRecord) else "metrics"


def _reply_mutations(key: str, content: Any) -> list[Mutation]:
    out: list[Mutation] = []
    for rname, rec in content.items():
        kind = _record_kind(rec)
        out += [Mutation("flower", key, rname, op) for op in ("missing_record", "wrong_record_type")]
        if kind == "arrays":
            tensors = dict(rec.to_torch_state_dict())
            out.append(Mutation("flower", key, rname, "extra_tensor"))
            for name in sorted(tensors):
                ops = [o for o in tensor_ops(tensors[name]) if o not in ("dtype_float32", "dtype_int32")]
                out += [Mutation("flower", key, f"{rname}.{name}", op) for op in ops]
            continue
        out.append(Mutation("flower", key, rname, "extra_key"))
        for fname, value in dict(rec).items():
            if kind == "metrics":
                ops = ["missing", "nan", "inf", "negative", "huge_int", "1e30", "list"]
                if isinstance(value, int) and not isinstance(value, bool):
                    ops.insert(1, "float_for_int")
            else:
                ops = ["missing", "empty", "other", "huge_int", "bool", "list"]
            out += [Mutation("flower", key, f"{rname}.{fname}", op) for op in ops]
    return out


def mutate_reply(m: Mutation, content: Any) -> Any:
    """A Flower reply's records with the mutation ``m`` applied (a new RecordDict)."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    records = dict(content.items())
    rname, _, fname = m.field.partition(".")
    rec = records[rname]
    kind = _record_kind(rec)
    if m.op == "missing_record":
        del records[rname]
    elif m.op == "wrong_record_type":
        records[rname] = ConfigRecord({"fuzz": "x"}) if kind != "config" else MetricRecord({"fuzz": 1.0})
    elif kind == "arrays":
        tensors = dict(rec.to_torch_state_dict())
        if m.op == "extra_tensor":
            import torch

            tensors[EXTRA_KEY] = torch.zeros(2)
        elif m.op == "missing_tensor":
            del tensors[fname]
        else:
            tensors[fname] = mutate_tensor(m.op, tensors[fname]).contiguous()
        records[rname] = ArrayRecord(tensors)
    else:
        values = dict(rec)
        if m.op == "extra_key":
            values["fuzz-extra"] = 1
        elif m.op == "missing":
            del values[fname]
        else:
            old = values[fname]
            values[fname] = {
                "nan": float("nan"), "inf": float("inf"), "huge_int": HUGE_INT, "1e30": 1e30,
                "float_for_int": old + 0.5 if is_number(old) else old,
                "negative": negated(old) if is_number(old) else old,
                "list": [old, old], "empty": "", "other": "0" * 64, "bool": True,
            }[m.op]  # fmt: skip
        records[rname] = (MetricRecord if kind == "metrics" else ConfigRecord)(values)
    return RecordDict(records)


class _Capture:
    """Log records of some loggers at WARNING and above, kept (and not printed) while a run lasts."""

    def __init__(self, *names: str):
        import logging

        self.loggers = [logging.getLogger(n) for n in names]
        self.lines: list[str] = []
        capture = self

        class _H(logging.Handler):
            def emit(self, record):
                capture.lines.append(record.getMessage())

        self.handler = _H(logging.WARNING)

    def __enter__(self) -> _Capture:
        self.old = [(lg.level, lg.propagate, list(lg.handlers)) for lg in self.loggers]
        for lg in self.loggers:
            lg.handlers = [self.handler]
            lg.setLevel(min(lg.level or 30, 30))
            lg.propagate = False
        return self

    def __exit__(self, *exc) -> None:
        for lg, (level, propagate, handlers) in zip(self.loggers, self.old):
            lg.handlers = handlers
            lg.setLevel(level)
            lg.propagate = propagate


_SUBJECT = re.compile(
    rf"\bnode\D{{0,4}}{FLOWER_NODE}\b|\b(client|partition)(-id|_id)?\D{{0,4}}{FLOWER_PARTITION}\b", re.IGNORECASE
)


def _rejections(records: list[dict], logs: list[str]) -> list[str]:
    """Reasons recorded for rejecting the mutated node's replies (metrics.jsonl entries under a key
    naming a rejection, or warnings that name the node or its partition)."""
    found = []

    def walk(obj: Any, rejecting: bool) -> None:
        if isinstance(obj, dict):
            who = {obj.get(k) for k in ("client", "partition", "partition-id", "partition_id")}
            if rejecting and (FLOWER_PARTITION in who or obj.get("node") == FLOWER_NODE):
                found.append(str(obj.get("reason", obj)))
            for k, v in obj.items():
                walk(v, rejecting or any(w in str(k).lower() for w in ("reject", "exclu", "refus")))
        elif isinstance(obj, list):
            for v in obj:
                walk(v, rejecting)

    for r in records:
        walk(r, False)
    found += [line for line in logs if _SUBJECT.search(line)]
    return found


class FlowerKind(Kind):
    name = "flower"
    description = (
        "Flower replies (handshake, initial loss, train, evaluate) of one node, read by the ServerApp (AdaFedAdam)"
    )

    def support(self, directory: Path) -> None:
        write_tiny_cache(directory / "cache", 24, seed=3)

    def run_config(self, support: Path, out: Path) -> dict[str, Any]:
        return dict(
            cache_dir=str(support / "cache"), rounds=1, num_clients=2, eval_every=1, output_dir=str(out),
            hidden_dims="[8]", direction="learned", local_steps=2, local_batch_size=8, progress=False, local_lr=0.2,
            recipe="adafedadam", min_clients=1,
        )  # fmt: skip

    def _run(self, support: Path, wrapper: _ReplyApp) -> tuple[Any, list[dict], list[str]]:
        """The ServerApp over two nodes (node 2's replies through ``wrapper``): (state, metrics.jsonl
        records, warnings logged)."""
        from asymvlm.federated import flower as F
        from asymvlm.testing.grid import LocalGrid

        out = support / "run"  # one output folder: the nodes' cached data stay valid between runs
        shutil.rmtree(out, ignore_errors=True)
        rc = self.run_config(support, out)
        nodes = [{"partition-id": p} for p in range(2)]
        with _Capture(F.__name__, "flwr") as cap:
            grid = LocalGrid(F.client_app, rc, nodes, apps={FLOWER_NODE: wrapper})
            state = F.run_flower_server(grid, rc)
        log = out / "metrics.jsonl"
        records = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
        return state, records, cap.lines

    def build(self, dest: Path, seed: int, support: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)

    def mutations(self, art: Path, support: Path, baseline: Any) -> list[Mutation]:
        replies = baseline[3]  # node 2's first reply of each message kind in the unmutated run
        out = []
        for key in ("query.handshake", "query.loss", "train", "evaluate"):
            if key in replies:
                out += _reply_mutations(key, replies[key])
        return out

    def load(self, art, work, support, mutation):
        from asymvlm.federated import flower as F

        app = _ReplyApp(F.client_app, mutation=mutation)
        state, records, logs = self._run(support, app)
        snapshot = {"round": state.round, "params": {k: v.detach().clone() for k, v in state.params.items()}}
        return snapshot, records, logs, app.record

    def names(self, m: Mutation, message: str) -> bool:
        return bool(_SUBJECT.search(message))

    def judge(self, m: Mutation, result: Any, baseline: Any, work: Path) -> tuple[str, str]:
        import torch

        snapshot, records, logs = result[:3]
        if same(snapshot, baseline[0]):
            return "equal", ""
        reasons = _rejections(records, logs)
        finite = all(bool(torch.isfinite(v).all()) for v in snapshot["params"].values())
        if reasons and finite:
            return "clean", f"rejected: {reasons[0][:200]}"
        return "silent", first_difference(baseline[0], snapshot) + ("" if finite else " (model not finite)")
