"""A Flower deployment on this machine's loopback: one ``flower-superlink``, N ``flower-supernode``
processes and ``flwr run``, started and torn down by :class:`LoopbackDeployment` (free ports, a
private ``FLWR_HOME``, optional TLS with certificates it makes, every process killed by PID with its
children). For trying a federation out before spreading it over machines, for the tests and for
``bench/flower.py``; a real federation runs the same commands on several hosts (README, "Flower").

Example::

    with LoopbackDeployment(workdir, nodes=[{"partition-id": 0}, {"partition-id": 1}]) as dep:
        dep.run("examples/flower_app", {"cache-dir": "...", "output-dir": "..."})
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from asymvlm.errors import ConfigError
from asymvlm.testing.procs import free_port, kill_tree, wait_for

__all__ = ["LoopbackDeployment", "make_certificates", "toml_value"]


def make_certificates(directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost")) -> dict[str, Path]:
    """A CA and a SuperLink certificate for ``hosts`` (what Flower's TLS guide makes with openssl):
    ``{"ca": ca.crt, "cert": server.pem, "key": server.key}``. For trials: one day of validity."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1))
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "asymvlm loopback CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(valid[0]).not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid[0]).not_valid_after(valid[1])
        .add_extension(x509.SubjectAlternativeName(names), critical=False).sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    out = {"ca": directory / "ca.crt", "cert": directory / "server.pem", "key": directory / "server.key"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    out["key"].chmod(0o600)
    return out


def toml_value(value: Any) -> str:
    """One ``--run-config`` / ``--node-config`` value in TOML (strings quoted, bools lower-case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if "'" in text:
        raise ConfigError(f"a config value may not contain a single quote: {text!r}")
    return f"'{text}'"


class LoopbackDeployment:
    """SuperLink + SuperNodes on 127.0.0.1 (``tls``: with certificates made in ``workdir``).

    Args:
        workdir: logs (``logs/*.log``), ``FLWR_HOME`` and certificates go here.
        nodes: one node config per SuperNode (e.g. ``{"partition-id": 0, "cache-dir": "..."}``).
        tls: TLS between the SuperNodes, the CLI and the SuperLink (else ``--insecure``).
        startup_timeout: seconds to wait for every SuperNode to join.
    """

    def __init__(
        self,
        workdir: str | Path,
        nodes: Sequence[Mapping[str, Any]],
        *,
        tls: bool = False,
        startup_timeout: float = 60.0,
    ):
        self.workdir = Path(workdir)
        self.nodes = [dict(n) for n in nodes]
        self.tls = tls
        self.startup_timeout = startup_timeout
        self.bin = Path(sys.executable).parent
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = 0

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> LoopbackDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def env(self) -> dict[str, str]:
        return {
            **os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self.workdir / "flwr-home"), "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
        }  # fmt: skip

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(argv, cwd=self.workdir, env=self.env(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs[name] = proc
        return proc

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        home = self.workdir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        link = [str(self.bin / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]  # fmt: skip
        node_security = ["--insecure"]
        connection = f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\n'
        if self.tls:
            certs = make_certificates(self.workdir / "certs")
            link += ["--ssl-ca-certfile", str(certs["ca"]), "--ssl-certfile", str(certs["cert"]),
                     "--ssl-keyfile", str(certs["key"])]  # fmt: skip
            node_security = ["--root-certificates", str(certs["ca"])]
            connection += f'root-certificates = "{certs["ca"]}"\n'
        else:
            link.append("--insecure")
            connection += "insecure = true\n"
        (home / "config.toml").write_text(connection)
        self._start("superlink", link)
        for i, node in enumerate(self.nodes):
            config = " ".join(f"{k}={toml_value(v)}" for k, v in node.items())
            self._start(
                f"supernode-{i}",
                [str(self.bin / "flower-supernode"), *node_security, "--superlink", f"127.0.0.1:{self.port}",
                 "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", config],
            )  # fmt: skip
        wait_for(self._all_joined, self.startup_timeout, f"{len(self.nodes)} SuperNodes to join the SuperLink")

    def _all_joined(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.logs / (name + '.log')}")
        return (self.logs / "superlink.log").read_text().count("Activated node_id") >= len(self.nodes)

    def stop(self) -> None:
        for proc in self.procs.values():
            kill_tree(proc)

    def kill_node(self, i: int) -> None:
        """Kill SuperNode ``i`` (and its ClientApp processes), as a data holder going away."""
        kill_tree(self.procs[f"supernode-{i}"])

    # -- runs -------------------------------------------------------------------------------------
    def run(self, app: str | Path, run_config: Mapping[str, Any], *, timeout: float = 600.0) -> str:
        """``flwr run APP loopback --stream --run-config ...`` (the app copied into the workdir, as
        ``flwr run`` bundles the folder); returns the CLI's output. The run's own progress is in
        ``output-dir`` (``metrics.jsonl``) and ``logs/superlink.log``."""
        target = self.workdir / "app"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(app, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        done = subprocess.run(
            [str(self.bin / "flwr"), "run", str(target), "loopback", "--stream", "--run-config", overrides],
            cwd=self.workdir, env=self.env(), capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"flwr run failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done.stdout + done.stderr

    def wait_for_file(self, path: Path, timeout: float = 300.0) -> None:
        wait_for(path.exists, timeout, str(path))
