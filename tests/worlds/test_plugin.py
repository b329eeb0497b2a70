"""The worlds are a plug-in of the core: they register themselves through the ``asymvlm.plugins``
entry point, and the core's lookups load them with no import of ``asymvlm.worlds`` by the user."""

import subprocess
import sys

import pytest

from asymvlm.errors import ConfigError
from asymvlm.plugins import DATA_WORLDS, DataWorld, data_world, declared_plugins, register_data_world


def test_the_worlds_are_declared_under_the_plugin_entry_point():
    assert ("worlds", "asymvlm.worlds.plugin") in {(ep.name, ep.value) for ep in declared_plugins()}


def test_core_lookups_load_the_worlds_without_an_import_by_the_user():
    code = (
        "import sys\n"
        "import asymvlm\n"
        "from asymvlm.config import DataArguments\n"
        "from asymvlm.encoders import load_encoder\n"
        "assert not any(m.startswith('asymvlm.worlds') for m in sys.modules), 'import asymvlm pulled the worlds'\n"
        "print(DataArguments(dataset='shapeworld:2').encoder, DataArguments().styles()[-1])\n"
        "try:\n"
        "    load_encoder('open_clip:asymvlm-toy-clip-v3')\n"
        "except ValueError as err:\n"
        "    print(type(err).__name__, err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    first, second = out.strip().splitlines()
    assert first == "open_clip:asymvlm-toy-clip reordered"
    assert second.startswith("ConfigError asymvlm-toy-clip-v3 is loaded with pretrained='shapeworld'")


def test_a_stale_egg_info_in_the_working_directory_does_not_hide_the_plugins(tmp_path):
    # a build in the source tree leaves asymvlm.egg-info there; run from that folder, it comes first on
    # sys.path (as the repository root does for `python -m pytest`), and it declares no plug-ins
    stale = tmp_path / "asymvlm.egg-info"
    stale.mkdir()
    (stale / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: asymvlm\nVersion: 0.0.1\n")
    (stale / "entry_points.txt").write_text("[console_scripts]\nasymvlm-train = asymvlm.training.cli:main\n")
    code = "from asymvlm.plugins import declared_plugins; print([ep.value for ep in declared_plugins()])"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert "asymvlm.worlds.plugin" in out.stdout


def test_shapeworld_is_the_default_data_world():
    world = data_world("shapeworld:3")
    assert world is not None and world.name == "shapeworld" and world.default
    assert data_world("imagefolder:/data") is world  # a local dataset spec: the default world's styles
    assert world.owns("shapeworld") and world.owns("shapeworld:2") and not world.owns("shapeworlds")


def test_a_second_default_world_is_refused():
    before = dict(DATA_WORLDS)
    with pytest.raises(ConfigError, match="is the default world already"):
        register_data_world(DataWorld("another", ("plain",), default=True))
    assert DATA_WORLDS == before
