"""``asymvlm-serve`` on this machine's loopback, for tests and benchmarks: started on a free port,
ready when ``/readyz`` says so, killed by PID (with its worker processes) on exit.

Example::

    with LoopbackServer(["--model", "runs/vmf/model", "--index", "galleries/sw"], workdir) as server:
        httpx.post(server.url + "/v1/search/text", json={"query": "a red circle"})
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from asymvlm.testing.procs import free_port, kill_tree, wait_for

__all__ = ["LoopbackServer", "serve_command"]


def serve_command() -> list[str]:
    """The installed ``asymvlm-serve`` console script next to this interpreter."""
    script = Path(sys.executable).with_name("asymvlm-serve")
    if not script.is_file():
        raise FileNotFoundError(f"asymvlm-serve is not installed next to {sys.executable} (pip install -e .)")
    return [str(script)]


class LoopbackServer:
    """``asymvlm-serve <args> --host 127.0.0.1 --port <free>`` in ``workdir`` (its cwd; the log goes to
    ``workdir/server.log``).

    Args:
        args: the server's arguments (no --host / --port).
        workdir: the process's working directory and where its log goes.
        env: extra environment variables (e.g. a private HOME).
        startup_timeout: seconds to wait for ``/readyz``.
        verify: for a TLS server (``--ssl_certfile`` among ``args``), the CA file that signed its certificate.
    """

    def __init__(
        self,
        args: Sequence[str],
        workdir: str | Path,
        *,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 180.0,
        verify: str | Path | bool = True,
    ):
        self.args = list(args)
        self.workdir = Path(workdir)
        self.env = dict(env or {})
        self.startup_timeout = startup_timeout
        if isinstance(verify, (str, Path)):
            import ssl

            verify = ssl.create_default_context(cafile=str(verify))
        self.verify = verify
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        scheme = "https" if "--ssl_certfile" in self.args else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def _ready(self) -> bool:
        import httpx

        if self.proc.poll() is not None:
            raise RuntimeError(f"asymvlm-serve exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
        try:
            return httpx.get(self.url + "/readyz", timeout=2, verify=self.verify).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self) -> LoopbackServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            [*serve_command(), *self.args, "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=self.workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        try:
            wait_for(self._ready, self.startup_timeout, f"asymvlm-serve on port {self.port}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc)
            self.proc = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
