"""A real Flower deployment on loopback: ``flower-superlink`` + 3 ``flower-supernode`` processes +
``flwr run examples/flower_app``, 2 rounds, insecure and with TLS certificates made here; the
result equals ``asymvlm-federate`` in-process. Processes are started and killed (by PID, with
their children) by the test, on free loopback ports, each wait bounded."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from asymvlm.cache import write_cache
from asymvlm.config import DataArguments, HeadArguments
from asymvlm.federated.checkpoint import load_server_state, round_dirs
from asymvlm.federated.config import FederatedArguments
from asymvlm.federated.data import get_federated_data
from asymvlm.federated.rounds import run_federated

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
APP = REPO / "examples" / "flower_app"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certs(d: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 / localhost (what Flower's TLS guide makes with openssl)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "asymvlm test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False).sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    d.mkdir(parents=True, exist_ok=True)
    out = {"ca": d / "ca.crt", "cert": d / "server.pem", "key": d / "server.key"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    try:
        family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.parametrize("tls", [False, True], ids=["insecure", "tls"])
def test_flwr_run_on_a_loopback_deployment_equals_in_process(tls, tmp_path):
    g = torch.Generator().manual_seed(5)
    img = torch.nn.functional.normalize(torch.randn(90, 16, generator=g), dim=-1)
    idx = torch.arange(90).repeat_interleave(2)
    txt = torch.nn.functional.normalize(img[idx] + 0.3 * torch.randn(180, 16, generator=g), dim=-1)
    cache = tmp_path / "cache"
    write_cache(cache, img, txt, idx)
    common = dict(rounds=2, num_clients=3, local_steps=3, local_batch_size=16, local_lr=0.2, recipe="fedadam")
    head = dict(hidden_dims=[32], direction="learned")

    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {
        **os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
        "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    port = free_port()
    security: list[str] = ["--insecure"]
    node_security: list[str] = ["--insecure"]
    connection = f'[superlink]\ndefault = "loop"\n\n[superlink.loop]\naddress = "127.0.0.1:{port}"\n'
    if tls:
        certs = make_certs(tmp_path / "certs")
        security = ["--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]),
                    "--ssl-keyfile", str(certs["key"])]  # fmt: skip
        node_security = ["--root-certificates", str(certs["ca"])]
        connection += f'root-certificates = "{certs["ca"]}"\n'
    else:
        connection += "insecure = true\n"
    (home / "config.toml").write_text(connection)
    procs: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, argv: list[str]) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "w")
        p = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    out = tmp_path / "out"
    try:
        start("superlink", [str(BIN / "flower-superlink"), *security, "--host", "127.0.0.1", "--port", str(port),
                            "--disable-runtime-dependency-installation"])  # fmt: skip
        for i in range(3):
            start(f"supernode-{i}", [str(BIN / "flower-supernode"), *node_security, "--superlink", f"127.0.0.1:{port}",
                                     "--host", "127.0.0.1", "--port", str(free_port()),
                                     "--node-config", f"partition-id={i}"])  # fmt: skip
        wait_for(
            lambda: (logs / "superlink.log").read_text().count("Activated node_id") >= 3, 60, "3 SuperNodes to join"
        )
        app = tmp_path / "app"
        shutil.copytree(APP, app)
        overrides = (
            f"cache-dir='{cache}' output-dir='{out}' num-server-rounds=2 num-clients=3 local-steps=3 "
            "local-batch-size=16 local-lr=0.2 recipe='fedadam' hidden-dims='[32]' direction='learned' "
            "round-timeout=120.0"
        )
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(app), "loop", "--stream", "--run-config", overrides],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        assert "Successfully started run" in run.stdout
        wait_for(lambda: (out / "model" / "asymvlm_config.json").is_file(), 240, "the run to save its model")
    finally:
        for p in procs:
            kill_tree(p)
    assert all(p.poll() is not None for p in procs)
    last = round_dirs(out / "checkpoints")[-1]
    deployed = load_server_state(last)
    assert deployed.round == 2
    fed = FederatedArguments(**common, output_dir=str(tmp_path / "in-process"), progress=False)
    ours, _ = run_federated(
        fed, get_federated_data(DataArguments(cache_dir=str(cache)), fed), head=HeadArguments(**head)
    )
    assert set(ours.params) == set(deployed.params)
    for k in ours.params:
        torch.testing.assert_close(deployed.params[k], ours.params[k], rtol=0, atol=1e-6)
