"""The command line refuses unusable options before any party starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mpc_fi.errors import ConfigError

FEDERATION = """\
owners:
  - name: owner0
    model: {factory: "mpc_fi.demo:mlp", weights: a.pt}
  - name: owner1
    model: {factory: "mpc_fi.demo:mlp", weights: b.pt}
querier: {name: querier, data: q.npy}
network: {port: 29500}
"""


def unwritable(tmp_path: Path) -> str:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    return str(folder / "labels.npy")


@pytest.mark.parametrize("output, words", [
    (lambda tmp: str(tmp / "missing" / "labels.npy"), "does not exist; create it first"),
    (lambda tmp: str(tmp), "is a folder"),
    (lambda tmp: str(tmp / "labels.csv"), "name the file *.npy"),
    pytest.param(unwritable, "no permission", marks=pytest.mark.skipif(
        os.geteuid() == 0, reason="root writes into read-only folders")),
], ids=["missing-folder", "a-folder", "wrong-suffix", "read-only"])
@pytest.mark.parametrize("command", [["run"], ["party", "--party", "querier"]])
def test_an_unusable_output_is_refused_before_any_party_starts(tmp_path, command, output, words):
    fed = tmp_path / "federation.yaml"
    fed.write_text(FEDERATION)
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "mpc_fi.cli", *command, "--federation", str(fed),
         "--output", output(tmp_path), "--run-dir", str(run_dir), "--timeout", "30"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == ConfigError.exit_code, out.stderr
    assert "mpc-fi: error: ConfigError: --output: " in out.stderr and words in out.stderr
    assert not run_dir.exists()  # no party started: no log, no rendezvous


def test_keygen_writes_a_pair_and_never_overwrites_it(tmp_path, capsys):
    from mpc_fi import cli, keys

    assert cli.main(["keygen", "owner0", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    public = keys.read_public(str(tmp_path / "owner0.key"))
    assert public in out and keys.fingerprint(public) in out
    assert (tmp_path / "owner0.key_secret").stat().st_mode & 0o077 == 0
    assert cli.main(["keygen", "owner0", "--dir", str(tmp_path)]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert keys.read_public(str(tmp_path / "owner0.key")) == public
