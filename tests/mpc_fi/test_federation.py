"""End to end through the real launcher: secure results equal the plaintext twin.

Tolerances (explicit, per mode):
- ``output`` mode: owners share fixed-point encodings of their contributions and the sum on
  shares is exact, so labels (and revealed scores) must equal the twin exactly.
- ``full`` mode: forward passes run on fixed-point shares. Measured on these models (3 owners,
  10 classes, 300 queries): max error of the averaged distribution 2.4e-3, of logits ~1e-4.
  Labels must agree wherever the plaintext top-two margin is at least ``FULL_PROB_TOL`` (soft
  voting, on the averaged distribution) or every owner's logit margin is at least
  ``FULL_LOGIT_TOL`` (hard voting); revealed distributions must be within ``FULL_PROB_TOL``.
Tie rule: lowest class index, in the twin and on shares.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpc_fi import ConfigError, Federation, InputError, UnsupportedModelError
from mpc_fi.models import LOAD_AUDIT
from mpc_fi.plain import top_two_margin
from protocols import REGISTRY
from launchers import LocalLauncher
from tests.conftest import logits_of

FULL_PROB_TOL = 1e-2
FULL_LOGIT_TOL = 1e-2

# (mode, protocol, owners, classes): a pairwise-covering subset runs by default; the full
# product of modes x protocols x N in {2,3,5} x C in {2,10} runs with -m slow.
DEFAULT_CASES = [
    ("output", "soft_vote", 3, 10), ("output", "hard_vote", 2, 2), ("output", "hard_vote", 5, 10),
    ("full", "soft_vote", 2, 10), ("full", "hard_vote", 3, 2), ("full", "soft_vote", 5, 2),
]
ALL_CASES = [(m, p, n, c) for m in ("output", "full") for p in ("soft_vote", "hard_vote")
             for n in (2, 3, 5) for c in (2, 10)]
CASES = [pytest.param(*case, id="-".join(map(str, case))) for case in DEFAULT_CASES] + [
    pytest.param(*case, id="-".join(map(str, case)), marks=pytest.mark.slow)
    for case in ALL_CASES if case not in DEFAULT_CASES]


def queries(n: int = 96, seed: int = 1) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, 6)).astype(np.float32)
    x[-8:] = x[0]  # repeated rows: identical queries must get identical answers
    return x


def stable_rows(mode: str, protocol: str, logits: list[torch.Tensor]) -> np.ndarray:
    if mode == "output":
        return np.ones(len(logits[0]), dtype=bool)
    if protocol == "soft_vote":
        avg = torch.stack([lg.softmax(-1) for lg in logits]).mean(0)
        return (top_two_margin(avg) >= FULL_PROB_TOL).numpy()
    return np.all([(top_two_margin(lg) >= FULL_LOGIT_TOL).numpy() for lg in logits], axis=0)


@pytest.mark.parametrize("mode, protocol, owners, classes", CASES)
def test_secure_equals_plaintext(federation_factory, mode, protocol, owners, classes):
    fed, models = federation_factory(num_owners=owners, num_classes=classes, mode=mode,
                                     protocol=protocol, reveal="scores", batch_size=40)
    x = queries()
    result = Federation(fed, timeout_s=300).run(x)
    logits = logits_of(models, x)
    twin = REGISTRY[protocol](num_classes=classes, num_owners=owners, reveal="scores").plaintext(logits)
    got = result.prediction
    stable = stable_rows(mode, protocol, logits)
    assert stable.mean() > 0.6, "too few rows above the tolerance: the test would prove little"
    np.testing.assert_array_equal(got.labels[stable], twin.labels[stable])
    atol = 1e-9 if mode == "output" else FULL_PROB_TOL
    np.testing.assert_allclose(got.scores, twin.scores, atol=atol)
    assert len(set(got.labels[-8:].tolist())) == 1
    # costs are reported for every computing party
    assert [c.party for c in result.costs] == list(fed.party_names[:owners + 1])
    assert all(c.rounds > 0 and c.bytes_sent > 0 for c in result.costs)


def test_label_release_matches_twin_and_reveals_no_scores(federation_factory):
    fed, models = federation_factory(num_owners=3, num_classes=4, protocol="hard_vote")
    x = queries(64)
    pred = Federation(fed).run(x).prediction
    twin = REGISTRY["hard_vote"](num_classes=4, num_owners=3).plaintext(logits_of(models, x))
    np.testing.assert_array_equal(pred.labels, twin.labels)
    assert pred.scores is None


def test_owner_weights_are_read_only_by_their_owner(federation_factory, tmp_path):
    fed, _ = federation_factory(num_owners=3, num_classes=3, mode="full")
    before = list(LOAD_AUDIT)
    results = LocalLauncher(fed, run_dir=tmp_path / "run").run(query=queries(8))
    assert LOAD_AUDIT == before, "the launching process must not read any owner's weights"
    for rank, owner in enumerate(fed.owners):
        assert results[rank]["loaded_files"] == [owner.model.weights]
    assert results[fed.querier_rank]["loaded_files"] == []
    # and the owner's log says so, tagged with its rank and role
    log = (tmp_path / "run" / "party-0-owner0.log").read_text()
    assert "[rank 0 owner owner0]" in log and "loaded own model" in log


def replace_owner(fed, index, **model_fields):
    import dataclasses

    owner = fed.owners[index]
    owners = list(fed.owners)
    owners[index] = dataclasses.replace(owner, model=dataclasses.replace(owner.model, **model_fields))
    return dataclasses.replace(fed, owners=tuple(owners))


def test_owners_disagreeing_on_class_count(federation_factory):
    fed, _ = federation_factory(num_owners=2, num_classes=3)
    kwargs = dict(fed.owners[1].model.kwargs, num_classes=4)
    fed = replace_owner(fed, 1, kwargs=kwargs, weights=None)
    with pytest.raises(InputError, match="disagree on the number of classes: owner0=3, owner1=4"):
        Federation(fed).run(queries(4))


def test_query_of_the_wrong_shape(federation_factory):
    fed, _ = federation_factory(num_owners=2, num_classes=3)
    with pytest.raises(InputError, match=r"queries of shape \('batch', 5\) do not fit"):
        Federation(fed).run(np.zeros((4, 5), dtype=np.float32))


@pytest.mark.parametrize("bad, words", [
    (np.array([[0.0, np.nan, 0, 0, 0, 0]], dtype=np.float32), "NaN or inf"),
    (np.zeros((0, 6), dtype=np.float32), "empty query"),
    (np.full((2, 6), 1e9, dtype=np.float32), "fixed-point range"),
])
def test_bad_queries_are_refused_by_every_party(federation_factory, bad, words):
    fed, _ = federation_factory(num_owners=2, num_classes=3)
    with pytest.raises(InputError, match=words):
        Federation(fed).run(bad)


def test_unsupported_layers_are_all_named_in_full_mode(federation_factory):
    fed, _ = federation_factory(num_owners=2, num_classes=3, mode="full")
    fed = replace_owner(fed, 0, factory="tests.models:gelu_mlp", kwargs={}, weights=None)
    fed = replace_owner(fed, 1, factory="tests.models:custom", kwargs={}, weights=None)
    with pytest.raises(UnsupportedModelError) as err:
        Federation(fed).run(queries(4))
    text = str(err.value)
    assert "[owner0]" in text and "1 (GELU): not supported on shares; use ReLU" in text


def test_layer_inside_a_custom_forward_is_named_with_the_fix(federation_factory):
    fed, _ = federation_factory(num_owners=2, num_classes=3, mode="full")
    fed = replace_owner(fed, 1, factory="tests.models:custom", kwargs={}, weights=None)
    with pytest.raises(UnsupportedModelError, match=r"(?s)\[owner1\] .*body.1 \(LayerNorm\): "
                                                    r"not supported on shares; use BatchNorm1d"):
        Federation(fed).run(queries(4))


def test_corrupt_and_pickled_weight_files(federation_factory, tmp_path):
    fed, _ = federation_factory(num_owners=2, num_classes=3)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(fed.owners[0].model.weights, "rb").read()[:100])
    with pytest.raises(UnsupportedModelError, match="corrupt or truncated"):
        Federation(replace_owner(fed, 0, weights=str(truncated))).run(queries(4))
    pickled = tmp_path / "pickled.pt"
    torch.save({"weight": torch.zeros(2), "payload": ConfigError("not a tensor")}, pickled)
    with pytest.raises(UnsupportedModelError, match="refused .*not a plain state_dict"):
        Federation(replace_owner(fed, 1, weights=str(pickled))).run(queries(4))


@pytest.mark.parametrize("factory, words", [("tests.models:nan_when", "holds NaN or inf"),
                                             ("tests.models:huge_logits",
                                              "exceeds the fixed-point range")])
def test_a_bad_model_output_mid_run_stops_every_party(federation_factory, tmp_path, factory,
                                                      words):
    fed, _ = federation_factory(num_owners=2, num_classes=3, batch_size=4)
    fed = replace_owner(fed, 1, factory=factory, kwargs={}, weights=None)
    x = np.clip(queries(12), -2, 2)
    x[9, 0] = 5.0  # nan_when: owner1's logits turn NaN in the third batch only
    with pytest.raises(InputError, match=r"\[owner1\]"):
        Federation(fed, run_dir=tmp_path).run(x)
    logs = {p.name.split("-")[2][:-4]: p.read_text() for p in tmp_path.glob("party-*.log")}
    assert words in logs["owner1"]
    for name in ("owner0", "querier"):
        assert "InputError: [owner1] reported a bad model output" in logs[name], name
    if "nan_when" in factory:
        assert "batch 2/3 done" in logs["querier"] and "batch 3/3 done" not in logs["querier"]
    assert not list(tmp_path.glob("result-[012].npz"))  # no partial result


def test_model_returning_the_wrong_shape(federation_factory):
    fed, _ = federation_factory(num_owners=2, num_classes=3)
    fed = replace_owner(fed, 0, factory="tests.models:wrong_output", kwargs={}, weights=None)
    with pytest.raises(UnsupportedModelError, match=r"\[owner0\] .*\(batch, classes\)"):
        Federation(fed).run(queries(4))
