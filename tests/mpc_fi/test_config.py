"""Federation files: valid ones load (YAML and TOML), bad ones name the key at fault."""

from __future__ import annotations

import textwrap

import pytest

from mpc_fi import ConfigError, FederationConfig

GOOD_YAML = """\
mode: output
protocol: {name: soft_vote}
reveal: label
owners:
  - name: hospital_a
    model: {factory: "mpc_fi.demo:mlp", weights: a.pt, kwargs: {in_features: 4}}
  - name: hospital_b
    model: {onnx: b.onnx}
querier: {name: clinic, data: q.npy}
"""


def write(tmp_path, text, name="fed.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_yaml_loads_and_resolves_paths_relative_to_the_file(tmp_path):
    fed = FederationConfig.load(write(tmp_path, GOOD_YAML))
    assert fed.party_names == ("hospital_a", "hospital_b", "clinic", "dealer")
    assert fed.owners[0].model.weights == str(tmp_path / "a.pt")
    assert fed.owners[1].model.onnx == str(tmp_path / "b.onnx")
    assert fed.querier.data == str(tmp_path / "q.npy")
    assert fed.dealer == "ttp" and fed.mode == "output" and fed.querier_rank == 2


def test_toml_gives_the_same_federation(tmp_path):
    toml = """\
    mode = "output"
    reveal = "label"
    [protocol]
    name = "soft_vote"
    [[owners]]
    name = "hospital_a"
    model = {factory = "mpc_fi.demo:mlp", weights = "a.pt", kwargs = {in_features = 4}}
    [[owners]]
    name = "hospital_b"
    model = {onnx = "b.onnx"}
    [querier]
    name = "clinic"
    data = "q.npy"
    """
    a = FederationConfig.load(write(tmp_path, GOOD_YAML))
    b = FederationConfig.load(write(tmp_path, toml, "fed.toml"))
    assert a == b
    assert a.fingerprint() == b.fingerprint()


def test_fingerprint_ignores_local_paths_but_not_public_settings(tmp_path):
    a = FederationConfig.load(write(tmp_path, GOOD_YAML))
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    b = FederationConfig.load(write(sub, GOOD_YAML))
    c = FederationConfig.load(write(sub, GOOD_YAML.replace("mode: output", "mode: full"), "c.yaml"))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


@pytest.mark.parametrize("edit, key, words", [
    (("reveal: label", "revael: label"), "revael", "did you mean 'reveal'"),
    (("mode: output", "mode: secret"), "mode", "output, full"),
    (("name: hospital_b", "name: hospital_a"), "owners[1].name", "duplicate party name"),
    (("name: clinic", "name: hospital_a"), "querier.name", "duplicate party name"),
    (("weights: a.pt", "wieghts: a.pt"), "owners[0].model.wieghts", "did you mean 'weights'"),
    (('factory: "mpc_fi.demo:mlp"', 'factory: "mpc_fi.demo.mlp"'), "owners[0].model.factory",
     "package.module:function"),
    (("{onnx: b.onnx}", "{onnx: b.onnx, factory: 'x:y'}"), "owners[1].model", "not both"),
    (("reveal: label", "reveal: everything"), "reveal", "'label' or 'scores'"),
    (("reveal: label", "reveal: label\ndealer: party0"), "dealer", "ttp, insecure-party-dealer"),
    (("reveal: label", "reveal: label\nbatch_size: 0"), "batch_size", "1..65536"),
    (("reveal: label", "reveal: label\nprecision_bits: 20"), "precision_bits", "above 16"),
    (("reveal: label", "reveal: label\nnetwork: {address: 10.1.2.3, port: 29500}"),
     "network.address", "acknowledge_plaintext_network"),
    (("reveal: label", "reveal: label\nnetwork: {port: 70000}"), "network.port", "1..65535"),
    (("reveal: label", "reveal: label\nnetwork: {prot: 29500}"), "network.prot", "did you mean 'port'"),
])
def test_bad_federation_file_names_the_key(tmp_path, edit, key, words):
    with pytest.raises(ConfigError) as err:
        FederationConfig.load(write(tmp_path, GOOD_YAML.replace(*edit)))
    assert err.value.key == key
    assert words in str(err.value)


@pytest.mark.parametrize("edit, key, lines", [
    (("mode: output", "mode: full\nmode: output"), "mode", "lines 1 and 2"),
    (("weights: a.pt, kwargs: {in_features: 4}", "weights: a.pt, weights: c.pt"),
     "owners[0].model.weights", "lines 6 and 6"),
    (("    model: {onnx: b.onnx}", "    model: {onnx: b.onnx}\n    name: hospital_c"),
     "owners[1].name", "lines 7 and 9"),
    (("protocol: {name: soft_vote}", "protocol:\n  name: soft_vote\n  name: plurality"),
     "protocol.name", "lines 3 and 4"),
])
def test_a_key_given_twice_is_refused_with_its_path_and_lines(tmp_path, edit, key, lines):
    with pytest.raises(ConfigError) as err:
        FederationConfig.load(write(tmp_path, GOOD_YAML.replace(*edit)))
    assert err.value.key == key
    assert f"given twice in fed.yaml ({lines})" in str(err.value)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    text = GOOD_YAML.replace("model: {factory", "model: &mlp {factory").replace(
        "model: {onnx: b.onnx}", "model: {<<: *mlp, weights: b.pt}")
    fed = FederationConfig.load(write(tmp_path, text))
    assert fed.owners[1].model.factory == "mpc_fi.demo:mlp"
    assert fed.owners[1].model.weights == str(tmp_path / "b.pt")


def test_toml_refuses_a_key_given_twice(tmp_path):
    with pytest.raises(ConfigError, match=r"not valid TOML: Cannot overwrite a value \(at line 2"):
        FederationConfig.load(write(tmp_path, 'mode = "full"\nmode = "output"\n', "fed.toml"))


def test_fewer_than_two_owners(tmp_path):
    text = GOOD_YAML.split("  - name: hospital_b")[0] + "querier: {name: clinic}\n"
    with pytest.raises(ConfigError, match="at least two owners") as err:
        FederationConfig.load(write(tmp_path, text))
    assert err.value.key == "owners"


@pytest.mark.parametrize("text, words", [
    ("owners: [\n", "not valid YAML"),
    ("- just\n- a list\n", "mapping at top level"),
])
def test_unparsable_files(tmp_path, text, words):
    with pytest.raises(ConfigError, match=words):
        FederationConfig.load(write(tmp_path, text))


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        FederationConfig.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"\.yaml, \.yml or \.toml"):
        FederationConfig.load(write(tmp_path, GOOD_YAML, "fed.json"))


def test_acknowledged_plaintext_network_is_accepted(tmp_path):
    fed = FederationConfig.load(write(tmp_path, GOOD_YAML + "network: {address: 10.1.2.3, port: "
                                      "29500, acknowledge_plaintext_network: true}\n"))
    assert not fed.network.is_loopback()


def test_unknown_protocol_and_parameter_name_the_key(tmp_path):
    # Refused when the federation loads, before any party could start.
    with pytest.raises(ConfigError, match="did you mean 'soft_vote'") as err:
        FederationConfig.load(write(tmp_path, GOOD_YAML.replace("soft_vote", "soft_voet")))
    assert err.value.key == "protocol.name"
    with pytest.raises(ConfigError) as err:
        FederationConfig.load(write(tmp_path, GOOD_YAML.replace(
            "{name: soft_vote}", "{name: soft_vote, temprature: 2}")))
    assert err.value.key == "protocol.temprature"


def test_validate_command_prints_the_public_settings_or_names_the_key(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    mpc_fi = str(Path(sys.executable).with_name("mpc-fi"))
    good = write(tmp_path, GOOD_YAML.replace("querier: {name: clinic",
                                             "querier: {input_range: [0, 16], name: clinic"))
    # The files it names do not exist here: settings only (tests/mpc_fi/test_validate.py checks
    # the files).
    proc = subprocess.run([mpc_fi, "validate", str(good), "--no-files"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: 2 owners (hospital_a, hospital_b), querier clinic")
    assert "query values in [0, 16], fingerprint" in proc.stdout
    assert "ranks: 0 owner hospital_a, 1 owner hospital_b, 2 querier clinic, 3 dealer dealer" \
        in proc.stdout
    proc = subprocess.run([mpc_fi, "validate", str(good)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 4 and "query file not found" in proc.stderr, proc.stderr
    bad = write(tmp_path, GOOD_YAML.replace("reveal: label", "revael: label"), "bad.yaml")
    proc = subprocess.run([mpc_fi, "validate", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "revael" in proc.stderr and "did you mean 'reveal'" in proc.stderr


# -- identities and transports ---------------------------------------------------------------
PARTIES = ("hospital_a", "hospital_b", "clinic", "dealer")


def _with_keys(tmp_path, names=PARTIES, extra=""):
    from mpc_fi import keys

    lines = ["identities:"]
    for name in names:
        keys.generate(tmp_path / "keys", name, force=True)
        lines.append(f"  {name}: keys/{name}.key")
    return write(tmp_path, GOOD_YAML + "\n".join(lines) + "\n" + extra)


def test_identities_make_the_transport_curve_even_between_hosts(tmp_path):
    fed = FederationConfig.load(_with_keys(tmp_path, extra="network: {address: 10.1.2.3, "
                                                           "port: 29500}\n"))
    assert fed.transport() == "curve"
    assert set(fed.identities) == set(PARTIES)
    assert all(len(i.public_key) == 40 and i.file.endswith(".key")
               for i in fed.identities.values())


def test_loopback_without_identities_runs_zmq_and_hosts_need_keys_or_the_acknowledgement(
        tmp_path):
    assert FederationConfig.load(write(tmp_path, GOOD_YAML)).transport() == "zmq"
    with pytest.raises(ConfigError, match="identities .*mpc-fi keygen") as info:
        FederationConfig.load(write(tmp_path, GOOD_YAML + "network: {address: 10.1.2.3, "
                                    "port: 29500}\n"))
    assert info.value.key == "network.address"
    for transport in ("zmq", "gloo"):
        with pytest.raises(ConfigError) as info:
            FederationConfig.load(write(tmp_path, GOOD_YAML + "network: {address: 10.1.2.3, "
                                        f"port: 29500, transport: {transport}}}\n"))
        assert info.value.key == "network.transport"
    with pytest.raises(ConfigError) as info:
        FederationConfig.load(write(tmp_path, GOOD_YAML + "network: {address: 10.1.2.3, "
                                    "port: 29500, transport: curve}\n"))
    assert info.value.key == "identities"


@pytest.mark.parametrize("names, extra, words", [
    (PARTIES[:3], "", "no public key for dealer"),
    (PARTIES + ("mallory",), "", "'mallory' is not a party"),
    (PARTIES, "network: {transport: gloo}\n", "does not prove the identities"),
])
def test_bad_identities_name_the_key(tmp_path, names, extra, words):
    with pytest.raises(ConfigError, match=words):
        FederationConfig.load(_with_keys(tmp_path, names, extra))


def test_two_parties_with_one_key_are_refused(tmp_path):
    from mpc_fi import keys

    path = _with_keys(tmp_path)
    public = keys.read_public(str(tmp_path / "keys" / "clinic.key"))
    text = path.read_text().replace("dealer: keys/dealer.key", f'dealer: "{public}"')
    with pytest.raises(ConfigError, match="same public key"):
        FederationConfig.load(write(tmp_path, text))


def test_the_fingerprint_covers_the_keys_not_where_they_were_read(tmp_path):
    import shutil

    first = FederationConfig.load(_with_keys(tmp_path))
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "keys", moved / "keys")
    second = FederationConfig.load(write(moved, (tmp_path / "fed.yaml").read_text()))
    assert second.fingerprint() == first.fingerprint()
    third = FederationConfig.load(_with_keys(tmp_path))  # fresh key pairs
    assert third.fingerprint() != first.fingerprint()
    # The file form round-trips: identities as public-key text.
    again = FederationConfig.from_dict(first.to_dict())
    assert again.fingerprint() == first.fingerprint()


def test_validate_checks_this_hosts_key_pair(tmp_path, capsys):
    from mpc_fi import cli

    import numpy as np

    path = _with_keys(tmp_path)
    np.save(tmp_path / "q.npy", np.zeros((3, 4), dtype=np.float32))
    assert cli.main(["validate", str(path), "--party", "clinic"]) == 0
    out = capsys.readouterr().out
    assert "clinic: key pair" in out and "ok" in out
    (tmp_path / "keys" / "clinic.key_secret").chmod(0o644)
    assert cli.main(["validate", str(path), "--party", "clinic"]) == 2
    assert "too open" in capsys.readouterr().err
