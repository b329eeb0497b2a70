"""A real Flower deployment on loopback (asymvlm/testing/flower_deploy.py): ``flower-superlink`` + 3
``flower-supernode`` processes + ``flwr run examples/flower_app``: 2 rounds with TLS certificates
made here equal ``asymvlm-federate`` in-process; SecAgg+ through real SuperNodes within its bound;
insecure, a SuperNode killed mid-run (the rounds go on with the others and say so) and the
ServerApp killed mid-run (``flwr run`` again resumes it, bit-identical to in-process). Every
process is killed by PID with its children, ports are free loopback ports, every wait is bounded."""

import json
from pathlib import Path

import pytest
import torch

from asymvlm.config import DataArguments
from asymvlm.errors import ConfigError
from asymvlm.federated.checkpoint import load_server_state, round_dirs
from asymvlm.federated.config import FederatedArguments
from asymvlm.federated.data import get_federated_data
from asymvlm.federated.rounds import run_federated
from asymvlm.heads import HeadConfig
from asymvlm.testing import LoopbackDeployment

APP = Path(__file__).resolve().parents[3] / "examples" / "flower_app"
pytestmark = pytest.mark.slow
# client_batch "1": one client at a time in process, as on every Flower node (bit-equal runs)
FED = dict(num_clients=3, local_steps=3, local_batch_size=16, local_lr=0.2, recipe="fedadam", client_batch="1")
HEAD = dict(hidden_dims=[32], direction="learned")


def run_config(cache: Path, out: Path, rounds: int, **kw) -> dict:
    return {
        "cache-dir": str(cache), "output-dir": str(out), "num-server-rounds": rounds, "num-clients": 3,
        "local-steps": 3, "local-batch-size": 16, "local-lr": 0.2, "recipe": "fedadam", "hidden-dims": "[32]",
        "direction": "learned", "round-timeout": 60.0, **kw,
    }  # fmt: skip


@pytest.mark.parametrize("tls", [True], ids=["tls"])  # the insecure variant: the fault tests below
@pytest.mark.parametrize("isolation", ["subprocess", "process-warm"])  # Flower's default; ClientApps forked warm
def test_flwr_run_on_a_loopback_deployment_equals_in_process(tls, isolation, tmp_path, synthetic_cache):
    cache, out = synthetic_cache(tmp_path / "cache", 90, seed=5), tmp_path / "out"
    nodes = [{"partition-id": i} for i in range(3)]
    with LoopbackDeployment(tmp_path / "deploy", nodes, tls=tls, isolation=isolation) as dep:
        printed = dep.run(APP, run_config(cache, out, 2), timeout=300)
        dep.wait_for_file(out / "model" / "asymvlm_config.json", 300)
        procs = list(dep.procs.values())
    assert "Successfully started run" in printed
    assert all(p.poll() is not None for p in procs)  # torn down
    deployed = load_server_state(round_dirs(out / "checkpoints")[-1])
    assert deployed.round == 2
    fed = FederatedArguments(**FED, rounds=2, output_dir=str(tmp_path / "in-process"), progress=False)
    ours, _ = run_federated(fed, get_federated_data(DataArguments(cache_dir=str(cache)), fed), head=HeadConfig(**HEAD))
    assert set(ours.params) == set(deployed.params)
    for k in ours.params:
        torch.testing.assert_close(deployed.params[k], ours.params[k], rtol=0, atol=1e-6)


def test_secure_aggregation_on_a_loopback_deployment(tmp_path, synthetic_cache):
    """SecAgg+ through real SuperNodes (the mod's state lives in each node's context across the
    protocol's four messages): one FedAvg round within the bound of the in-process aggregate."""
    cache, out = synthetic_cache(tmp_path / "cache", 90, seed=5), tmp_path / "out"
    rc = run_config(cache, out, 1, **{"recipe": "fedavg", "secure-aggregation": True, "secagg-num-shares": 3,
                                      "secagg-reconstruction-threshold": 2})  # fmt: skip
    with LoopbackDeployment(tmp_path / "deploy", [{"partition-id": i} for i in range(3)]) as dep:
        dep.run(APP, rc, timeout=300)
        dep.wait_for_file(out / "model" / "asymvlm_config.json", 300)
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["secure_aggregation"]["clients"] == [0, 1, 2] and rec["rejected"] == []
    deployed = load_server_state(round_dirs(out / "checkpoints")[-1])
    fed = FederatedArguments(**{**FED, "recipe": "fedavg"}, rounds=1, output_dir=str(tmp_path / "in"), progress=False)
    ours, _ = run_federated(fed, get_federated_data(DataArguments(cache_dir=str(cache)), fed), head=HeadConfig(**HEAD))
    bound = rec["secure_aggregation"]["error_bound"]
    assert 0 < bound < 1e-4
    assert max(float((ours.params[k] - deployed.params[k]).abs().max()) for k in ours.params) <= bound


def test_a_supernode_killed_mid_run(tmp_path, synthetic_cache):
    """Node 2 dies after round 1: the later rounds complete with the two others (min-clients 2) and
    record the lost partition; with min-clients 3 they are skipped, each with its reason."""
    cache, out = synthetic_cache(tmp_path / "cache", 90, seed=5), tmp_path / "out"
    with LoopbackDeployment(tmp_path / "deploy", [{"partition-id": i} for i in range(3)]) as dep:
        import threading

        def kill_after_round_1():
            dep.wait_for_file(out / "checkpoints" / "round-000001", 240)
            dep.kill_node(2)

        killer = threading.Thread(target=kill_after_round_1, daemon=True)
        killer.start()
        dep.run(APP, run_config(cache, out, 3, **{"min-clients": 2, "round-timeout": 20.0}), timeout=400)
        dep.wait_for_file(out / "model" / "asymvlm_config.json", 300)
        killer.join(5)
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rec] == [1, 2, 3]
    assert rec[0]["rejected"] == []
    later = [r for r in rec[1:] if r["rejected"]]
    assert later, rec  # the dead node's partition is reported in a later round
    for r in later:
        # the SuperLink answers for the dead node once its heartbeat lapses, else the round's wait ends
        why = r["rejected"][0]["reason"]
        assert [x["client"] for x in r["rejected"]] == [2] and ("no reply" in why or "Node Unavailable" in why), why
        assert "skipped" not in r and r["aggregator_info"]["weights"] and len(r["aggregator_info"]["weights"]) == 2


def test_a_killed_serverapp_resumes_bit_identically(tmp_path, synthetic_cache):
    """The ServerApp process is killed after round 1; ``flwr run`` again with ``resume = true`` and
    the same output directory continues from the checkpoint and ends where an uninterrupted
    in-process run ends, bit for bit."""
    import threading

    import psutil

    cache, out = synthetic_cache(tmp_path / "cache", 90, seed=5), tmp_path / "out"
    rc = run_config(cache, out, 3, resume=True)
    with LoopbackDeployment(tmp_path / "deploy", [{"partition-id": i} for i in range(3)]) as dep:
        link = psutil.Process(dep.procs["superlink"].pid)

        def kill_serverapp_after_round_1():
            dep.wait_for_file(out / "checkpoints" / "round-000001", 240)
            apps = [p for p in link.children(recursive=True) if "flwr-serverapp" in " ".join(p.cmdline())]
            assert apps, "no flwr-serverapp process under the SuperLink"
            for p in apps:
                p.kill()

        killer = threading.Thread(target=kill_serverapp_after_round_1, daemon=True)
        killer.start()
        try:
            dep.run(APP, rc, timeout=300)
        except RuntimeError:
            pass  # the CLI may report the killed run as failed
        killer.join(60)
        assert not (out / "model").exists()  # it did not finish
        done_before = len(round_dirs(out / "checkpoints"))
        assert 1 <= done_before < 3
        dep.run(APP, rc, timeout=300)  # the same command again
        dep.wait_for_file(out / "model" / "asymvlm_config.json", 300)
    deployed = load_server_state(round_dirs(out / "checkpoints")[-1])
    assert deployed.round == 3
    fed = FederatedArguments(**FED, rounds=3, output_dir=str(tmp_path / "in-process"), progress=False)
    ours, _ = run_federated(fed, get_federated_data(DataArguments(cache_dir=str(cache)), fed), head=HeadConfig(**HEAD))
    for k in ours.params:
        assert torch.equal(deployed.params[k], ours.params[k]), k


# -- the documentation's Flower recipe (docs/guide/flower.md), run as written ----------------------
REPO = Path(__file__).resolve().parents[3]
RECIPE_START, RECIPE_END = "<!-- flower-recipe:start -->", "<!-- flower-recipe:end -->"
RECIPE_PAGE = REPO / "docs" / "guide" / "flower.md"


def recipe_commands(text: str) -> str | None:
    """The bash block between the page's recipe markers (None without them)."""
    import re

    if RECIPE_START not in text or RECIPE_END not in text:
        return None
    part = text.split(RECIPE_START, 1)[1].split(RECIPE_END, 1)[0]
    block = re.search(r"```bash\n(.*?)```", part, re.S)
    return block.group(1) if block else None


def run_recipe(script: str, root: Path, timeout: float = 900.0) -> tuple[int, str]:
    """Run ``script`` with bash in ``root`` (a folder standing for the repository root: its ``.venv``
    and ``examples`` link to this checkout's) with this venv off PATH, as a shell a user opens;
    returns the script's exit status and everything it printed. The background processes it starts
    (SuperLink, SuperNodes) stay children of the bash process, so they are killed by its PID, with
    every process they started."""
    import os
    import subprocess
    import sys

    from asymvlm.testing import kill_tree, wait_for

    for name in (".venv", "examples"):
        (root / name).symlink_to(REPO / name)
    (root / "recipe.sh").write_text(script + '\necho "$?" > recipe.exit\nwait\n')  # wait: keep the jobs children
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "FLWR_HOME", "PYTHONPATH")}
    env.update(PATH=path, FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1")
    log = open(root / "recipe.log", "w")
    proc = subprocess.Popen(["bash", "recipe.sh"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        wait_for(lambda: (root / "recipe.exit").exists() or proc.poll() is not None, timeout, "the recipe")
    finally:
        kill_tree(proc)
    status = int((root / "recipe.exit").read_text()) if (root / "recipe.exit").exists() else -1
    return status, (root / "recipe.log").read_text(errors="replace")


def test_the_docs_flower_recipe_runs_as_written(tmp_path):
    """The commands between ``<!-- flower-recipe:start -->`` and ``<!-- flower-recipe:end -->`` in
    docs/guide/flower.md, run as written on this machine (a SuperLink, two SuperNodes with their own caches,
    ``flwr run --stream``): the run ends, its rounds are printed, and the saved model records the
    encoder the caches were built with and reloads with it (fingerprint checked)."""
    import socket

    from asymvlm.model import AsymVLM

    script = recipe_commands(RECIPE_PAGE.read_text())
    assert script is not None, f"{RECIPE_PAGE} has no Flower recipe between {RECIPE_START} and {RECIPE_END}"
    import re

    for port in sorted({int(p) for p in re.findall(r"--port\s+(\d+)", script)}):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port}, which the docs' recipe uses, is taken on this machine")
    root = tmp_path / "repo"
    root.mkdir()
    status, printed = run_recipe(script, root)
    assert status == 0, printed[-4000:]
    out = root / "trial" / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r["round"] for r in records]
    assert rounds == list(range(1, len(rounds) + 1)) and rounds and all(r["rejected"] == [] for r in records)
    # the ServerApp's progress reaches the terminal through flwr run --stream (the ServerApp
    # process's own output does not: flower-superexec keeps it)
    assert f"round {rounds[-1]}/{rounds[-1]}: 2 updates, 0 rejected" in printed, printed[-4000:]
    manifest = json.loads((root / "trial" / "holder0" / "manifest.json").read_text())["encoder"]
    saved = json.loads((out / "model" / "asymvlm_config.json").read_text())["encoder"]
    assert saved["fingerprint"] == manifest["fingerprint"] and saved["spec"] == manifest["spec"]
    model = AsymVLM.from_pretrained(out / "model")  # loads the caches' encoder, checks its fingerprint
    assert model.encoder is not None and model.encoder.fingerprint == manifest["fingerprint"]


def test_a_deployment_with_an_unknown_isolation_or_poll_interval_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="isolation must be one of"):
        LoopbackDeployment(tmp_path / "d", [{"partition-id": 0}], isolation="thread")
    with pytest.raises(ConfigError, match="task_poll_interval"):
        LoopbackDeployment(tmp_path / "d", [{"partition-id": 0}], task_poll_interval=-1.0)
