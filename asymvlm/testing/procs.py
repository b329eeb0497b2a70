"""Services on this machine's loopback, for tests and benchmarks: a free port, waiting for a
condition, and killing a process with every process it started (by PID, never by name).

Example:
    >>> 1024 <= free_port() <= 65535
    True
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

__all__ = ["free_port", "kill_tree", "wait_for"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a process and every process it started (psutil walks the tree)."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        family = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)
    try:
        proc.wait(timeout=10)  # reap it (no zombie, returncode set)
    except subprocess.TimeoutExpired:  # pragma: no cover - killed above
        pass


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.25) -> None:
    """Poll ``predicate`` until it is true; a TimeoutError naming ``what`` after ``timeout`` seconds."""
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
