"""asymvlm on Flower: seconds per round and bytes per client, in-process vs Flower, same workload.

One federation (FedAdam, 2 clients, 3 rounds of 5 local steps, the paper's head on 512-d
embeddings of 400 synthetic images) run three ways side by side, all on this machine:

* ``asymvlm-federate``'s in-process rounds (the baseline);
* the asymvlm ServerApp over :class:`~asymvlm.testing.LocalGrid` (Flower's messages and
  records, every ClientApp in this process: the cost of the message layer alone);
* Flower's deployment engine on loopback (:class:`~asymvlm.testing.LoopbackDeployment`:
  a SuperLink, one SuperNode per client, ``flwr run``): what a real federation pays per round
  besides the network (a SuperNode starts a ClientApp process per message), once per
  ``--deploy_modes`` entry ``ISOLATION[@POLL]``: ``subprocess`` (Flower's default), ``process``
  (one ``flower-superexec`` per SuperNode started by the harness), ``@POLL`` the SuperExec's task
  poll in seconds (Flower's default 1.0). Flower 1.42 has no long-running ClientApp: every mode
  starts a fresh ``flwr-clientapp`` per message (asymvlm/testing/flower_deploy.py).

Seconds per round are each run's own ``metrics.jsonl`` figure (server-side, from sending the
round to its checkpoint; the median round, every round in the JSON); the three runs end at the
same parameters (checked). Bytes per client
are the serialised Flower record of one client's reply (``ArrayRecord.count_bytes``) next to the
raw tensor bytes asymvlm counts; then the upload per client for ``trainable`` head / lora / both
on the v3 toy CLIP's text tower (LoRA rank 8 on the MLPs, built on first use: about 4 minutes).

Run:  python bench/flower.py [--rounds 3] [--deploy_modes subprocess,process,subprocess@0.05] [--json PATH]
      (alone: it starts processes; about 2 minutes per deployment mode)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from _common import Results

from asymvlm.cache import write_cache
from asymvlm.config import DataArguments
from asymvlm.federated.config import FederatedArguments
from asymvlm.federated.data import FederatedData, get_federated_data
from asymvlm.federated.rounds import Federation, run_federated
from asymvlm.heads import HeadConfig

REPO = Path(__file__).resolve().parents[1]


def round_seconds(out: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--skip_lora", action="store_true", help="Skip the head / lora / both upload rows.")
    p.add_argument("--deploy_modes", default="subprocess",
                   help="Comma-separated ISOLATION[@POLL] deployments: subprocess | process, @ the SuperExec's "
                   "task poll in seconds (e.g. subprocess,process,subprocess@0.05).")  # fmt: skip
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from asymvlm.federated import flower as F
    from asymvlm.federated.flower.config import to_arrays
    from asymvlm.testing import LocalGrid, LoopbackDeployment

    work = Path(tempfile.mkdtemp(prefix="asymvlm-flower-bench-"))
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(400, args.dim, generator=g), dim=-1)
    idx = torch.arange(400).repeat_interleave(2)
    txt = torch.nn.functional.normalize(img[idx] + 0.3 * torch.randn(800, args.dim, generator=g), dim=-1)
    cache = work / "cache"
    write_cache(cache, img, txt, idx)
    # client_batch "1": one client at a time in process, as on every Flower node (bit-equal runs)
    fed_kw = dict(num_clients=args.clients, rounds=args.rounds, local_steps=5, local_batch_size=64, local_lr=0.1,
                  recipe="fedadam", eval_every=0, progress=False, client_batch="1")  # fmt: skip
    head = HeadConfig()  # the paper's MLP, 1024 x 3
    rc = {
        "cache-dir": str(cache), "num-server-rounds": args.rounds, "num-clients": args.clients, "local-steps": 5,
        "local-batch-size": 64, "local-lr": 0.1, "recipe": "fedadam", "eval-every": 0,
    }  # fmt: skip

    fed = FederatedArguments(**fed_kw, output_dir=str(work / "in-process"))
    state, _ = run_federated(fed, get_federated_data(DataArguments(cache_dir=str(cache)), fed), head=head)
    local_cfg = {**rc, "output-dir": str(work / "local-grid")}
    nodes = [{"partition-id": i} for i in range(args.clients)]
    local = F.run_flower_server(LocalGrid(F.client_app, local_cfg, nodes), local_cfg)
    from asymvlm.federated.checkpoint import load_server_state, round_dirs

    deployed = {}
    for mode in [m.strip() for m in args.deploy_modes.split(",") if m.strip()]:
        isolation, _, poll = mode.partition("@")
        name = f"deployed-{isolation}-{poll or 'default'}"
        with LoopbackDeployment(work / f"deploy-{name}", nodes, isolation=isolation,
                                task_poll_interval=float(poll) if poll else None) as dep:  # fmt: skip
            dep.run(REPO / "examples" / "flower_app", {**rc, "output-dir": str(work / name)}, timeout=900)
            dep.wait_for_file(work / name / "model" / "asymvlm_config.json", 600)
        deployed[mode] = (name, load_server_state(round_dirs(work / name / "checkpoints")[-1]))

    def diff(other):
        return max(float((state.params[k] - other.params[k]).abs().max()) for k in state.params)

    ins, loc = (round_seconds(work / d) for d in ("in-process", "local-grid"))
    import statistics

    mean = statistics.median  # the median round: the first in-process round pays torch's warm-up (1.2 s vs 0.2)
    results = Results("flower", "asymvlm on Flower: seconds per round and bytes per client vs in-process")
    results.add(f"round, {args.clients} clients: asymvlm ServerApp over LocalGrid vs in-process", mean(loc), mean(ins),
                "s", higher_is_better=False, per_round=loc, baseline_per_round=ins)  # fmt: skip
    for mode, (name, _) in deployed.items():
        dpl = round_seconds(work / name)
        label = "" if mode == "subprocess" else f" ({mode})"
        results.add(f"round, {args.clients} clients: Flower deployment on loopback{label} vs in-process", mean(dpl),
                    mean(ins), "s", higher_is_better=False, per_round=dpl, baseline_per_round=ins)  # fmt: skip
    reply = to_arrays({k: torch.zeros_like(v) for k, v in state.params.items()})
    raw = sum(v.numel() * v.element_size() for v in state.params.values())
    results.add("upload per client and round: Flower record vs raw tensors", reply.count_bytes(), raw, "bytes",
                higher_is_better=False, better="smaller", worse="larger")  # fmt: skip
    deploy_diffs = ", ".join(f"deployment {mode} {diff(st):.1e}" for mode, (_, st) in deployed.items())
    results.note(f"max |parameter difference| vs in-process: LocalGrid {diff(local):.1e}, {deploy_diffs}")

    if not args.skip_lora:
        from asymvlm.encoders import load_encoder
        from asymvlm.worlds.toyclip import TOY_CLIP_SPECS, TOY_CLIP_TAG

        sizes = {}
        for trainable in ("head", "lora", "both"):  # a fresh encoder each: peft injects LoRA in place
            enc = load_encoder(TOY_CLIP_SPECS[3], pretrained=TOY_CLIP_TAG, device="cpu")
            dim = int(enc.encode_text(["a red circle"]).shape[-1])
            data = FederatedData([None] * 2, [1, 1], dim, {"fingerprint": enc.fingerprint}, enc)
            f = FederatedArguments(num_clients=2, trainable=trainable, output_dir=str(work / trainable), progress=False)
            sizes[trainable] = Federation.build(f, data, HeadConfig(), {}).comm["sent_bytes"]
        results.add("upload per client: LoRA only vs head only (toy CLIP v3 text tower)", sizes["lora"], sizes["head"],
                    "bytes", higher_is_better=False, better="smaller", worse="larger")  # fmt: skip
        results.add("upload per client: head + LoRA vs head only", sizes["both"], sizes["head"], "bytes",
                    higher_is_better=False, better="smaller", worse="larger")  # fmt: skip

    for row in results.rows:
        print(f"{row['case']}: {row['ours']:.4g} vs {row['baseline']:.4g} {row['unit']} (ratio {row['ratio']:.3g})")
    for n in results.notes:
        print(n)
    results.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
