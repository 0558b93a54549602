"""The registries: lazy resolution, explicit registration, no silent overwrite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpc_fi import plugins
from mpc_fi.errors import ConfigError, MpcFiError
from mpc_fi.plugins import PROTOCOLS, LazyRegistry, lookup

ROOT = Path(__file__).resolve().parents[2]


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env=env, timeout=300)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_looking_up_one_protocol_imports_only_that_protocol():
    mods = _modules_after("from mpc_fi.plugins import PROTOCOLS, lookup\n"
                          "lookup(PROTOCOLS, 'soft_vote', key='protocol.name')")
    assert "protocols.soft_vote" in mods
    assert not {"protocols.gnmax", "protocols.confident_gnmax", "protocols.top_k",
                "mpc_fi.privacy", "dp_accounting", "scipy"} & mods


def test_the_fork_server_preload_keeps_dp_accounting_and_scipy_out():
    # what every party is forked from (its exit_with_parent watcher is harmless here)
    mods = _modules_after("import launchers._preload")
    assert {"torch", "crypten", "mpc_fi.party", "protocols.base"} <= mods
    assert not {"dp_accounting", "scipy", "protocols.gnmax", "sklearn", "onnxruntime"} & mods


def test_a_differentially_private_protocol_still_resolves_with_its_accounting():
    cls = lookup(PROTOCOLS, "gnmax", key="protocol.name")
    assert cls.differentially_private and cls.name == "gnmax"
    assert "dp_accounting" in sys.modules


def test_every_registered_name_resolves_to_a_class_of_that_name():
    for name, cls in plugins.registry(PROTOCOLS).items():
        assert cls.name == name
    assert plugins.names(PROTOCOLS) == sorted(plugins.registry(PROTOCOLS))


def test_protocol_classes_import_lazily_from_the_package():
    import protocols
    from protocols import REGISTRY, SoftVote

    assert REGISTRY["soft_vote"] is SoftVote
    with pytest.raises(AttributeError):
        protocols.NoSuchProtocol  # noqa: B018


def test_unknown_names_suggest_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'soft_vote'"):
        lookup(PROTOCOLS, "soft_vot", key="protocol.name")


def test_a_lazy_registry_refuses_silent_overwrite():
    reg = LazyRegistry({"soft_vote": "protocols.soft_vote:SoftVote"})
    reg.register("soft_vote", "protocols.soft_vote:SoftVote")  # the same target: fine
    with pytest.raises(MpcFiError, match="already registered"):
        reg.register("soft_vote", "protocols.hard_vote:HardVote")
    reg.register("soft_vote", "protocols.hard_vote:HardVote", force=True)
    assert reg["soft_vote"].name == "hard_vote"
    assert reg.targets() == {"soft_vote": "protocols.hard_vote:HardVote"}


def test_register_refuses_to_replace_a_builtin(monkeypatch):
    monkeypatch.setattr(plugins, "_REGISTERED", {})
    with pytest.raises(MpcFiError, match="already registered"):
        plugins.register(PROTOCOLS, "soft_vote", "protocols.hard_vote:HardVote")
    plugins.register(PROTOCOLS, "my_vote", "protocols.hard_vote:HardVote")
    assert lookup(PROTOCOLS, "my_vote", key="protocol.name").name == "hard_vote"


def test_two_entry_points_giving_one_name_two_classes_are_refused():
    merged: dict = {}
    plugins._merge(merged, "soft_vote", "protocols.soft_vote:SoftVote", "builtin")
    with pytest.raises(MpcFiError, match="rename one of them"):
        plugins._merge(merged, "soft_vote", "elsewhere:SoftVote", "entry point other")


def test_a_malformed_target_is_named():
    with pytest.raises(MpcFiError, match="package.module:Class"):
        plugins.resolve("protocols.soft_vote")


def test_importing_the_engine_loads_no_protocol_and_no_scikit_learn():
    mods = _modules_after("import mpc_fi")
    assert not {"sklearn", "dp_accounting", "scipy", "protocols", "launchers"} & mods
