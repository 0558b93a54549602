"""``mpc-fi validate`` reports, before anything starts, every bad input of THREAT_MODEL.md's
matrix that can be known from the federation file and the files it names, with the error class
``run`` raises for it.

Each case writes a small federation (two MLP owners of the demo's factory, a query file) and
breaks one thing. The validate side runs for every case in the default suite (it starts no
party); the comparison with a real ``Federation(...).run()`` runs for two cases here and for all
of them under ``-m slow``.

Cases of the matrix that cannot be known before the parties meet are not here: a model output
that turns NaN mid-run, a busy port, an unreachable host, a party that dies, mismatched package
versions (tests/launchers, tests/mpc_fi/test_federation.py cover those).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from mpc_fi import Federation
from mpc_fi.config import FederationConfig
from mpc_fi.demo import mlp
from mpc_fi.errors import ConfigError, InputError, MpcFiError, UnsupportedModelError
from mpc_fi.preflight import check_files

FEATURES = 4


def _owner(tmp: Path, name: str, classes: int = 3, scale: float = 1.0) -> None:
    torch.manual_seed(len(name))
    model = mlp(in_features=FEATURES, hidden=5, num_classes=classes)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    torch.save(model.state_dict(), tmp / f"{name}.pt")


def _base(tmp: Path) -> dict:
    _owner(tmp, "a")
    _owner(tmp, "b")
    np.save(tmp / "q.npy", np.random.default_rng(0).uniform(0, 1, (5, FEATURES)).astype(np.float32))
    return {"mode": "output", "protocol": "soft_vote",
            "owners": [f'{{name: {n}, model: {{factory: "mpc_fi.demo:mlp", weights: {n}.pt, '
                       f'kwargs: {{in_features: {FEATURES}, hidden: 5, num_classes: 3}}}}}}'
                       for n in ("a", "b")],
            "querier": "{name: q, data: q.npy, input_range: [0, 1]}"}


def _write(tmp: Path, parts: dict, extra: str = "") -> Path:
    owners = "\n".join(f"  - {o}" for o in parts["owners"])
    text = (f"mode: {parts['mode']}\nprotocol: {parts['protocol']}\nowners:\n{owners}\n"
            f"querier: {parts['querier']}\n{parts.get('extra', '')}{extra}")
    path = tmp / "federation.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _case_missing_weights(tmp, p):
    (tmp / "b.pt").unlink()


def _case_pickled_weights(tmp, p):
    (tmp / "b.pt").write_bytes(b"\x80\x04c__builtin__\neval\n(S'1'\ntR.")


def _case_factory_import(tmp, p):
    p["owners"][1] = p["owners"][1].replace("mpc_fi.demo:mlp", "no_such_module:build")


def _case_missing_query_file(tmp, p):
    (tmp / "q.npy").unlink()


def _case_nan_query(tmp, p):
    x = np.load(tmp / "q.npy")
    x[2, 1] = np.nan
    np.save(tmp / "q.npy", x)


def _case_query_out_of_range(tmp, p):
    np.save(tmp / "q.npy", np.full((3, FEATURES), 2.0, dtype=np.float32))


def _case_query_wrong_shape(tmp, p):
    np.save(tmp / "q.npy", np.zeros((3, FEATURES + 1), dtype=np.float32))


def _case_class_counts_differ(tmp, p):
    _owner(tmp, "b", classes=4)
    p["owners"][1] = p["owners"][1].replace("num_classes: 3", "num_classes: 4")


def _case_full_mode_overflow(tmp, p):
    _owner(tmp, "b", scale=1e6)
    p["mode"] = "full"


def _case_past_activation_bound(tmp, p):
    p["mode"] = "full"
    p["extra"] = "activation_bound: 0.01\n"


def _case_unknown_protocol(tmp, p):
    p["protocol"] = "sof_vote"


def _case_protocol_parameter(tmp, p):
    p["protocol"] = "{name: top_k, k: 0}"


def _case_duplicate_names(tmp, p):
    p["owners"][1] = p["owners"][1].replace("name: b", "name: a")


CASES = {
    "missing weights file": (_case_missing_weights, UnsupportedModelError),
    "pickled weights": (_case_pickled_weights, UnsupportedModelError),
    "factory module cannot be imported": (_case_factory_import, UnsupportedModelError),
    "missing query file": (_case_missing_query_file, InputError),
    "NaN in a query": (_case_nan_query, InputError),
    "query outside input_range": (_case_query_out_of_range, InputError),
    "query of the wrong shape": (_case_query_wrong_shape, InputError),
    "owners disagree on the class count": (_case_class_counts_differ, InputError),
    "full mode: model could overflow": (_case_full_mode_overflow, InputError),
    "full mode: activations past activation_bound": (_case_past_activation_bound, InputError),
    "unknown protocol": (_case_unknown_protocol, ConfigError),
    "top_k with k: 0": (_case_protocol_parameter, MpcFiError),
    "duplicate party names": (_case_duplicate_names, ConfigError),
}


def _prepare(tmp: Path, case: str) -> Path:
    parts = _base(tmp)
    CASES[case][0](tmp, parts)
    return _write(tmp, parts)


def _validate(path: Path) -> MpcFiError | None:
    try:
        check_files(FederationConfig.load(path))
    except MpcFiError as exc:
        return exc
    return None


def _run(path: Path) -> MpcFiError | None:
    try:
        Federation(path, timeout_s=180).run()
    except MpcFiError as exc:
        return exc
    return None


def test_a_good_federation_validates_and_lists_what_it_checked(tmp_path):
    path = _write(tmp_path, _base(tmp_path))
    lines = check_files(FederationConfig.load(path))
    assert lines[0].startswith("q: 5 queries of shape (4,)")
    assert any(line.startswith("a: model loads (Sequential") for line in lines)
    proc = subprocess.run([str(Path(sys.executable).with_name("mpc-fi")), "validate", str(path),
                           "--party", "b"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ok: b: model loads" in proc.stdout and "ok: a:" not in proc.stdout


@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_reports_each_case_with_the_class_run_raises(tmp_path, case):
    want = CASES[case][1]
    found = _validate(_prepare(tmp_path, case))
    assert isinstance(found, want), f"{case}: validate gave {found!r}"


def _same_class_as_run(tmp_path, case):
    path = _prepare(tmp_path, case)
    by_validate, by_run = _validate(path), _run(path)
    assert by_run is not None and by_validate is not None, (by_validate, by_run)
    assert type(by_validate) is type(by_run), (by_validate, by_run)


@pytest.mark.parametrize("case", ["missing weights file", "owners disagree on the class count"])
def test_validate_and_run_agree(tmp_path, case):
    _same_class_as_run(tmp_path, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_validate_and_run_agree_on_every_case(tmp_path, case):
    _same_class_as_run(tmp_path, case)
