"""Files and folders the package writes get open()'s permissions (0o666 / 0o777 & ~umask), not 0600."""

import os
import stat

import pytest
import torch

from asymvlm.io import (
    SafetensorsStreamWriter,
    atomic_directory,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["umask022", "umask077", "umask002"])
def umask(request):
    old = os.umask(request.param)  # process-global: restored whatever the test does
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_file_writers_use_the_umask(tmp_path, umask):
    want = 0o666 & ~umask
    with open(tmp_path / "reference.txt", "w") as f:  # what open() gives, for comparison
        f.write("x")
    assert mode(tmp_path / "reference.txt") == want
    assert mode(atomic_write_bytes(b"abc", tmp_path / "a.bin")) == want
    assert mode(atomic_write_json({"a": 1}, tmp_path / "sub" / "report.json")) == want
    assert mode(atomic_save_safetensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")) == want
    assert not [p for p in tmp_path.rglob(".*")]  # no temp file left behind


def test_replacing_a_file_gives_the_umask_mode(tmp_path, umask):
    path = tmp_path / "metrics.json"
    path.write_text("{}")
    os.chmod(path, 0o600)
    atomic_write_json({"a": 2}, path)
    assert mode(path) == 0o666 & ~umask and path.read_text().strip().endswith("}")


def test_atomic_directory_and_stream_writer_use_the_umask(tmp_path, umask):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        assert mode(tmp) == 0o777 & ~umask
        atomic_write_json({"a": 1}, tmp / "config.json")
        with SafetensorsStreamWriter(tmp / "x.safetensors", {"a": (torch.float32, (2,))}) as w:
            w.write("a", torch.zeros(2))
    assert mode(target) == 0o777 & ~umask
    assert mode(target / "config.json") == mode(target / "x.safetensors") == 0o666 & ~umask


def test_saved_model_files_use_the_umask(tmp_path, umask):
    from asymvlm.heads import TextHead
    from asymvlm.model import AsymVLM

    out = AsymVLM(TextHead(dim=8, hidden_dims=(4,))).save_pretrained(tmp_path / "model")
    files = [p for p in out.iterdir() if p.is_file()]
    assert files and {p.name: mode(p) for p in files} == {p.name: 0o666 & ~umask for p in files}


def test_writing_does_not_change_the_umask(tmp_path, umask):
    atomic_write_bytes(b"x", tmp_path / "a")
    assert os.umask(umask) == umask  # os.umask returns the previous value: still the test's
