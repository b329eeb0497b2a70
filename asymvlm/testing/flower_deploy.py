"""A Flower deployment on this machine's loopback: one ``flower-superlink``, N ``flower-supernode``
processes and ``flwr run``, started and torn down by :class:`LoopbackDeployment` (free ports, a
private ``FLWR_HOME``, optional TLS with certificates it makes, every process killed by PID with its
children). For trying a federation out before spreading it over machines, for the tests and for
``bench/flower.py``; a real federation runs the same commands on several hosts (README, "Flower").

How a SuperNode runs its ClientApp (``isolation``, Flower 1.42):

* ``"subprocess"`` (Flower's default): the SuperNode starts its own ``flower-superexec``, which starts
  a fresh ``flwr-clientapp`` process for every message (it pulls one task from the SuperNode's
  Runtime API, installs the app bundle, imports the app, answers and exits).
* ``"process"``: the SuperNode runs with ``--isolation process`` and this harness starts one
  ``flower-superexec`` per SuperNode itself (``--parent-pid`` of its SuperNode, killed by PID with
  it): the same per-message ``flwr-clientapp`` process, launched by a SuperExec whose environment
  and lifetime the operator controls (what a node uses to run ClientApps in another environment).

* ``"process-warm"``: as ``"process"``, but the SuperExec is :func:`warm_superexec`: Flower's own
  SuperExec loop whose executor *forks* each ClientApp process from a parent that imported Flower,
  torch and asymvlm once (:data:`WARM_PRELOAD`) and never runs a task itself. Every message still
  runs Flower's ``run_clientapp`` in a process of its own that starts without any state of an
  earlier message (the Runtime API, node config, run config and state dir as with
  ``flwr-clientapp``); only the interpreter start and the imports are saved.

Flower 1.42 has no long-running ClientApp: ``flwr-clientapp`` serves exactly one task and exits
(``flwr.supernode.runtime.run_clientapp``), in every mode; its warm executor pools are for the
Kubernetes executor and for AgentApp / model / connector tasks only. ``task_poll_interval`` sets
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (seconds between the SuperExec's polls for a task; Flower's
default 1.0) for either mode. The SuperNode's idle poll of the SuperLink (3 s) and the ServerApp's
poll for replies (3 s) are fixed in Flower 1.42.

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

__all__ = ["LoopbackDeployment", "make_certificates", "toml_value", "ISOLATIONS"]

ISOLATIONS = ("subprocess", "process", "process-warm")  # how a SuperNode runs its ClientApps (module docstring)
# what a warm SuperExec imports once, before it forks any ClientApp process (isolation "process-warm")
WARM_PRELOAD = ("flwr.supernode.runtime.run_clientapp", "asymvlm.federated.flower.client",
                "asymvlm.federated.rounds", "asymvlm.federated.client")  # fmt: skip
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # seconds between a SuperExec's task polls (0.01-60, default 1)


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
        isolation: ``"subprocess"`` (Flower's default) or ``"process"`` (one ``flower-superexec``
            per SuperNode started here; module docstring).
        task_poll_interval: seconds between a SuperExec's polls for a task (None: Flower's 1.0).
    """

    def __init__(
        self,
        workdir: str | Path,
        nodes: Sequence[Mapping[str, Any]],
        *,
        tls: bool = False,
        startup_timeout: float = 60.0,
        isolation: str = "subprocess",
        task_poll_interval: float | None = None,
    ):
        if isolation not in ISOLATIONS:
            raise ConfigError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
        if task_poll_interval is not None and not 0.01 <= task_poll_interval <= 60:
            raise ConfigError(f"task_poll_interval must be in [0.01, 60] seconds, got {task_poll_interval}")
        self.workdir = Path(workdir)
        self.nodes = [dict(n) for n in nodes]
        self.tls = tls
        self.startup_timeout = startup_timeout
        self.isolation = isolation
        self.task_poll_interval = task_poll_interval
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
        env = {
            **os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self.workdir / "flwr-home"), "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
        }  # fmt: skip
        if self.task_poll_interval is not None:
            env[POLL_ENV] = repr(float(self.task_poll_interval))
        return env

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
            runtime = free_port()  # the SuperNode's Runtime API, where its SuperExec / ClientApps connect
            supernode = self._start(
                f"supernode-{i}",
                [str(self.bin / "flower-supernode"), *node_security, "--superlink", f"127.0.0.1:{self.port}",
                 "--host", "127.0.0.1", "--port", str(runtime), "--node-config", config,
                 "--isolation", "subprocess" if self.isolation == "subprocess" else "process"],
            )  # fmt: skip
            # the node's own SuperExec: exits with its SuperNode (--parent-pid)
            address = ["--runtime-api-address", f"127.0.0.1:{runtime}", "--parent-pid", str(supernode.pid)]
            if self.isolation == "process":
                self._start(f"superexec-{i}", [str(self.bin / "flower-superexec"), "--insecure", *address])
            elif self.isolation == "process-warm":
                self._start(f"superexec-{i}", [sys.executable, "-m", "asymvlm.testing.flower_deploy", *address])
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
        """Kill SuperNode ``i`` (and its SuperExec and ClientApp processes), as a data holder going away."""
        for name in (f"superexec-{i}", f"supernode-{i}"):
            if name in self.procs:
                kill_tree(self.procs[name])

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


# ----------------------------------------------------------------------------------------------
# a SuperExec that forks its ClientApp processes from a warm parent (isolation "process-warm")
# ----------------------------------------------------------------------------------------------
def warm_superexec(argv: Sequence[str] | None = None) -> int:
    """``python -m asymvlm.testing.flower_deploy --runtime-api-address HOST:PORT [--parent-pid PID]
    [--preload MODULE ...]``: Flower 1.42's SuperExec (``run_superexec``, insecure, on loopback)
    with an executor that forks every ClientApp process from this process after importing the
    ``--preload`` modules once (default :data:`WARM_PRELOAD`). The child runs Flower's
    ``run_clientapp`` with the task's token and exits; other task types start as Flower does.
    Relies on ``flwr.supercore.superexec`` internals of Flower 1.42 (pinned)."""
    import argparse
    import importlib

    import flwr.supercore.superexec.run_superexec as superexec
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
    from flwr.supercore.superexec.executor.types import LaunchResult

    p = argparse.ArgumentParser(description=warm_superexec.__doc__.splitlines()[0])
    p.add_argument("--runtime-api-address", required=True)
    p.add_argument("--parent-pid", type=int, default=None)
    p.add_argument("--preload", nargs="*", default=list(WARM_PRELOAD))
    args = p.parse_args(argv)
    for module in args.preload:
        importlib.import_module(module)

    class ForkExecutor(SubprocessExecutor):
        def launch(self, spec):  # type: ignore[no-untyped-def]
            if spec.task_type != TaskType.CLIENT_APP:
                return super().launch(spec)
            pid = os.fork()
            if pid == 0:  # the ClientApp process: Flower's own, from the task's token on
                code = 1
                try:
                    from flwr.supernode.runtime.run_clientapp import run_clientapp

                    run_clientapp(spec.runtime_api_address, spec.token, insecure=True, parent_pid=spec.parent_pid,
                                  runtime_dependency_install=spec.runtime_dependency_install)  # fmt: skip
                    code = 0
                except SystemExit as done:  # run_clientapp ends with flwr_exit
                    code = done.code if isinstance(done.code, int) else 1
                finally:
                    os._exit(code)
            return LaunchResult.accepted()

        def reconcile(self) -> None:  # reap the finished ClientApp processes
            while True:
                try:
                    pid, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid == 0:
                    return

    superexec.get_executor = lambda *a, **k: ForkExecutor()
    superexec.run_superexec(runtime_api_address=args.runtime_api_address, insecure=True, parent_pid=args.parent_pid)
    return 0


if __name__ == "__main__":
    raise SystemExit(warm_superexec())
