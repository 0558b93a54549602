"""What actually crosses the wire: the audit records each party's outgoing traffic and every
decryption. For every protocol and mode the only decryption is the agreed release, at the
querier; every other opening is masked by fresh dealer material (checked against the dealer's
keys by :func:`mpc_fi.audit.verify`); no owner's weights or individual outputs, and in full mode
no query, appear in plaintext (or as their fixed-point encoding) in any party's traffic or logs.

Secrets are searched as whole rows (a contribution, a logit vector, a weight row, a query) in
every view a message could use; random shares reproduce such a row with negligible probability,
so any match is treated as a leak.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from launchers import LocalLauncher
from mpc_fi import audit
from mpc_fi.models import extract_architecture
from protocols import REGISTRY
from tests.conftest import logits_of

SCALE = 1 << 16
#: protocol parameters for the audit runs (protocols without required parameters need none)
AUDIT_PARAMS: dict[str, dict] = {
    "top_k": {"k": 2}, "confident_vote": {"threshold": 2},
    "gnmax": {"sigma": 1.0}, "confident_gnmax": {"threshold": 2, "sigma_threshold": 1.0, "sigma": 1.0},
}


def secret_rows(tensors: list[torch.Tensor]) -> list[bytes]:
    """Byte patterns of every non-zero row of the secrets as float32, float64 and fixed-point
    int64 (truncated and rounded), whatever view a message uses."""
    patterns: list[bytes] = []
    for t in tensors:
        rows = t.detach().to(torch.float64)
        rows = rows.reshape(-1, rows.shape[-1]) if rows.dim() > 1 else rows.reshape(1, -1)
        for row in rows:
            if not row.any():
                continue
            for coded in ((row * SCALE).long(), (row * SCALE).round().long()):
                patterns.append(coded.numpy().tobytes())
            patterns.append(row.numpy().tobytes())
            patterns.append(row.to(torch.float32).numpy().tobytes())
    return patterns


def leaks(record: audit.WireRecord, patterns: list[bytes]) -> int:
    """Whole secret rows found in a message, in any view (int64 encoding, float64, float32).

    Rows, not single values: comparisons on few bits legitimately send masked values from a
    small range, where one matching element proves nothing; a matching row of C values does.
    """
    data = record.data
    blob = data if isinstance(data, bytes) else data.tobytes()
    return sum(p in blob for p in patterns)


#: Audited in the default suite; every other protocol x mode under -m slow (make test-all).
DEFAULT_AUDITS = {("soft_vote", "output"), ("gnmax", "output"), ("hard_vote", "full")}
AUDITS = [pytest.param(p, m, marks=() if (p, m) in DEFAULT_AUDITS else pytest.mark.slow)
          for p in sorted(REGISTRY) for m in ("output", "full")]


@pytest.mark.parametrize("protocol, mode", AUDITS)
def test_only_the_release_is_opened_and_no_secret_crosses_the_wire(federation_factory, tmp_path,
                                                                   mode, protocol):
    fed, models = federation_factory(num_owners=3, num_classes=4, mode=mode, protocol=protocol,
                                     batch_size=16, params=AUDIT_PARAMS.get(protocol))
    x = np.random.default_rng(3).normal(size=(24, 6)).astype(np.float32)
    run_dir = tmp_path / "run"
    LocalLauncher(fed, run_dir=run_dir, audit=True).run(query=x)
    logs = {r: audit.load(str(run_dir / f"audit-{r}.npz")) for r in range(len(fed.party_names))}
    q = fed.querier_rank

    # 1. Decryptions: only towards the querier, one release per batch (2 batches).
    for rank, log in logs.items():
        for dst, shape, value in log.decryptions:
            assert dst == q, f"rank {rank} decrypted a {shape} tensor for {dst}"
            assert (value is not None) == (rank == q)
    opened = [v for _, _, v in logs[q].decryptions]
    assert [len(v) for v in opened] == [16, 8]

    # 1b. Every message has a declared reason; every opening is this party's share masked by
    # dealer material regenerated from the dealer's keys, none of it used twice.
    assert audit.verify(logs, querier=q, mode=mode, dealer=fed.compute_world_size) == []
    masked = [s for s in logs[0].sites if s.kind == "masked"]
    assert masked, "the comparison circuits' openings must be seen"

    # 2. Secrets of each owner never appear in any other party's traffic.
    logits = logits_of(models, x)
    twin = REGISTRY[protocol](num_classes=4, num_owners=3, **AUDIT_PARAMS.get(protocol, {}))
    for k, model in enumerate(models):
        secrets = [logits[k], twin.local_contribution(logits[k])]
        if mode == "full":
            secrets += list(extract_architecture(model, (6,))[1].values())
        rows = secret_rows(secrets)
        for rank, log in logs.items():
            if rank == k:
                continue
            found = sum(leaks(rec, rows) for rec in log.sent)
            assert found == 0, f"owner{k}'s secrets appear {found} times in rank {rank}'s traffic"

    # 3. The query: only the querier sends it, and only in output mode (to the owners, by design).
    rows = secret_rows([torch.from_numpy(x)])
    for rank, log in logs.items():
        found = sum(leaks(rec, rows) for rec in log.sent)
        if rank == q and mode == "output":
            assert found > 0  # the audit sees the plaintext query it is designed to send
        else:
            assert found == 0, f"query values appear {found} times in rank {rank}'s traffic"

    # 4. Logs hold no secret value.
    text = "\n".join(p.read_text() for p in run_dir.glob("party-*.log"))
    for k in range(len(models)):
        for v in logits[k].flatten()[:20].tolist():
            assert f"{v:.5f}" not in text


def test_the_check_sees_a_plaintext_leak_in_any_view():
    secret = torch.tensor([[0.125, -2.5, 3.75, 0.0625]], dtype=torch.float64)
    patterns = secret_rows([secret])
    random_share = np.random.default_rng(0).integers(-2**62, 2**62, size=64, dtype=np.int64)
    assert leaks(audit.WireRecord("send", 1, random_share), patterns) == 0
    for view in ((secret * SCALE).long().numpy(), secret.numpy(), secret.float().numpy()):
        padded = np.concatenate([np.zeros(3, view.dtype), view.ravel(), np.zeros(2, view.dtype)])
        assert leaks(audit.WireRecord("send", 1, padded), patterns) > 0
    import pickle

    assert leaks(audit.WireRecord("all_gather_object", None, pickle.dumps(secret.numpy())),
                 patterns) > 0
