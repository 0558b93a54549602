"""The audit sees every opening, including the comparison circuits' raw collectives.

Each case runs 3 computing parties and the TTP dealer with the wire audit on (the dealer's audit
holds its per-party stream keys), then :func:`mpc_fi.audit.verify` regenerates every declared
mask from those keys and compares it with the bytes each party actually sent.

Honest runs (the comparison circuits and the CrypTen operations full mode uses) pass. Three
injected faults each fail: an extra unmasked opening slipped into ``_b2a`` (the attack that the
old audit missed: owner1 received owner0's one-hot vote in the clear), an opening that declares
a mask it does not apply, and dealer material used to mask two openings.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpc_fi import audit

WORLD = 3
VALUES = np.array([[3.0, 1.0, 2.0, 3.0], [0.5, 4.0, -1.0, 2.0], [1.0, 1.0, 1.0, 7.0]])


def _argmax(rank: int, fault: str | None) -> list:
    import torch

    from mpc_fi import compare
    from mpc_fi._crypten import load_crypten

    crypten = load_crypten()
    if fault == "extra-unmasked-opening":
        honest = compare._b2a

        def leaky_b2a(be, bits):
            if isinstance(be, compare._Mpc):  # the vote bits, in the clear, to every party
                be._xor_reduce(compare.pack_bits(bits.unsqueeze(0)))
            return honest(be, bits)

        compare._b2a = leaky_b2a
    elif fault == "declared-but-unmasked":
        honest_open = compare._Mpc.open_bits

        def open_bits(self, bits):
            n = bits.numel()
            start = self._dab_at
            r_a = self._dab[0][start:start + n]
            self._dab_at += n
            with audit.opening("masked", "compare.bits", lambda: [
                    audit.part(bits, self._at(self._dab_off, start), kind="bit", combine="xor",
                               pack=True)]):
                opened = compare.unpack_bits(
                    self._xor_reduce(compare.pack_bits(bits.unsqueeze(0))), n)[0]
            return opened, r_a

        compare._Mpc.open_bits = open_bits
        assert honest_open is not open_bits
    elif fault == "reused-mask":
        def and_(self, x, y):  # every AND masked by the same first triple words
            n = x.numel()
            a, b, c = (t[0:n].view(x.shape) for t in self._and)
            self._and_at += n
            total = self.needs.and_words
            with audit.opening("masked", "compare.and", lambda: [
                    audit.part(x, self._at(self._and_off, 0), combine="xor"),
                    audit.part(y, self._at(self._and_off, 0, total), combine="xor")]):
                opened = self._xor_reduce(torch.cat([(x ^ a).flatten(), (y ^ b).flatten()]))
            eps, dlt = opened[:n].view(x.shape), opened[n:].view(x.shape)
            z = c ^ (eps & b) ^ (a & dlt)
            return z ^ (eps & dlt) if self.rank == 0 else z

        compare._Mpc.and_ = and_
    x = crypten.cryptensor(torch.tensor(VALUES), src=0)
    one_hot = compare.argmax_one_hot_shares(x.share, None)
    opened = crypten.mpc.MPCTensor.from_shares(one_hot, precision=0).get_plain_text(dst=WORLD - 1)
    return None if opened is None else opened.tolist()


def _full_mode_ops(rank: int) -> list:
    import torch

    from mpc_fi._crypten import load_crypten

    crypten = load_crypten()
    x = crypten.cryptensor(torch.tensor(VALUES), src=0)
    w = crypten.cryptensor(torch.ones(4, 2) / 4, src=1)
    y = (x.matmul(w) * x[:, :2]).relu()  # Beaver matmul and mul, truncation, comparison
    z = x.softmax(-1) + x.square()
    out = [y.get_plain_text(dst=WORLD - 1), z.get_plain_text(dst=WORLD - 1)]
    return [None if t is None else t.tolist() for t in out]


def _audited(mpc, tmp_path, fn, *args):
    results = mpc(fn, WORLD, *args, audit_dir=tmp_path)
    logs = {r: audit.load(str(tmp_path / f"audit-{r}.npz")) for r in range(WORLD + 1)}
    return results, audit.verify(logs, querier=WORLD - 1, dealer=WORLD)


def test_an_honest_argmax_passes_and_every_opening_is_checked(mpc, tmp_path):
    results, problems = _audited(mpc, tmp_path, _argmax, None)
    assert problems == []
    want = np.eye(4)[[0, 1, 3]]  # ties go to the lowest index
    np.testing.assert_array_equal(np.array(results[WORLD - 1]), want)
    log = audit.load(str(tmp_path / "audit-0.npz"))
    kinds = {s.name for s in log.sites if s.kind == "masked"}
    assert {"compare.and", "compare.bits"} <= kinds
    assert log.dealer_keys is None and audit.load(str(tmp_path / "audit-3.npz")).dealer_keys


def test_crypten_operations_of_full_mode_pass(mpc, tmp_path):
    results, problems = _audited(mpc, tmp_path, _full_mode_ops)
    assert problems == []
    names = {s.name for s in audit.load(str(tmp_path / "audit-1.npz")).sites}
    assert {"beaver.matmul", "beaver.mul", "beaver.wraps", "beaver.square",
            "compare.and"} <= names


@pytest.mark.parametrize("fault, message", [
    ("extra-unmasked-opening", "outside any audited site"),
    ("declared-but-unmasked", "other than its share of the secret masked"),
    ("reused-mask", "masks two openings"),
])
def test_an_injected_fault_fails_the_audit(mpc, tmp_path, fault, message):
    _, problems = _audited(mpc, tmp_path, _argmax, fault)
    assert any(message in p for p in problems), problems


def test_a_run_without_the_dealer_keys_cannot_pass():
    log = audit.AuditLog(rank=0)
    assert any("no dealer keys" in p for p in audit.verify({0: log, 1: audit.AuditLog(rank=1)},
                                                           querier=1))
