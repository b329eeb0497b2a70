"""The package's threading default (GOMP_SPINCOUNT=1000 when imported before torch; a user's
OMP_WAIT_POLICY or GOMP_SPINCOUNT wins; nothing when torch came first), checked in fresh
interpreters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = (
    "import json, os, sys\n"
    "if sys.argv[1] == 'torch':\n"
    "    import torch\n"
    "import asymvlm\n"
    "print(json.dumps({k: os.environ.get(k) for k in ('GOMP_SPINCOUNT', 'OMP_WAIT_POLICY')}))\n"
)


def _probe(first: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | env
    out = subprocess.run(
        [sys.executable, "-c", PROBE, first], env=clean, capture_output=True, text=True, check=True, timeout=300
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("first", "env", "expected"),
    [
        ("asymvlm", {}, {"GOMP_SPINCOUNT": "1000", "OMP_WAIT_POLICY": None}),  # the default
        ("asymvlm", {"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": "ACTIVE"}),
        ("asymvlm", {"GOMP_SPINCOUNT": "50"}, {"GOMP_SPINCOUNT": "50", "OMP_WAIT_POLICY": None}),
        ("torch", {}, {"GOMP_SPINCOUNT": None, "OMP_WAIT_POLICY": None}),  # too late: not pretended
    ],
)
def test_threading_default(first, env, expected):
    assert _probe(first, **env) == expected
