"""Exactness of the secure comparisons and argmax against their plaintext twins.

Two layers:

* **simulated parties** (fast, hundreds of random cases): the circuits of :mod:`mpc_fi.compare`
  run in ``P`` threads whose backend is the real one (:class:`mpc_fi.compare._Mpc`: Beaver ANDs,
  daBit conversions, pooled dealer material) over an in-memory communicator and an in-memory
  dealer; every result must equal the plaintext twin exactly, ties included;
* **real parties** (CrypTen processes, both dealers, N = 2, 3, 5 owners + querier): the public
  functions of :mod:`mpc_fi.secure` on ``MPCTensor`` inputs, again equal to the twins.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from mpc_fi import compare, plain
from mpc_fi.bounds import ContributionRange, aggregate_range, contribution_range
from mpc_fi.compare import LAN, WAN, ValueRange

MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------
# Simulated parties: the real backend over an in-memory communicator and dealer
# ---------------------------------------------------------------------------------------
class _Hub:
    """What the parties share: a rendezvous for collectives and a trusted dealer."""

    def __init__(self, world: int, seed: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list = [None] * world
        self.gen = torch.Generator().manual_seed(seed)
        self.lock = threading.Lock()
        self.dealt: dict[int, list] = {}
        self.rounds = 0

    def exchange(self, rank: int, value):
        self.slots[rank] = value
        self.barrier.wait()
        everything = list(self.slots)
        if rank == 0:
            self.rounds += 1
        self.barrier.wait()
        return everything

    def _rand(self, n: int) -> torch.Tensor:
        return torch.randint(-(2 ** 63), 2 ** 63 - 1, (n,), generator=self.gen, dtype=torch.int64)

    def _xor_split(self, value: torch.Tensor) -> list[torch.Tensor]:
        shares = [self._rand(value.numel()) for _ in range(self.world - 1)]
        last = value.clone()
        for s in shares:
            last ^= s
        return shares + [last]

    def _add_split(self, value: torch.Tensor) -> list[torch.Tensor]:
        shares = [self._rand(value.numel()) for _ in range(self.world - 1)]
        return shares + [value - sum(shares)]

    def deal(self, call: int, needs: compare._Needs) -> list:
        """Material for every party, made once per call index."""
        with self.lock:
            if call not in self.dealt:
                per_party: list[dict] = [{} for _ in range(self.world)]
                if needs.and_words:
                    a, b = self._rand(needs.and_words), self._rand(needs.and_words)
                    for r, parts in enumerate(zip(self._xor_split(a), self._xor_split(b),
                                                  self._xor_split(a & b))):
                        per_party[r]["and"] = parts
                if needs.dabits:
                    bits = torch.randint(0, 2, (needs.dabits,), generator=self.gen)
                    for r, parts in enumerate(zip(self._add_split(bits),
                                                  [s & 1 for s in self._xor_split(bits)])):
                        per_party[r]["dab"] = parts
                if needs.mul:
                    a, b = self._rand(needs.mul), self._rand(needs.mul)
                    for r, parts in enumerate(zip(self._add_split(a), self._add_split(b),
                                                  self._add_split(a * b))):
                        per_party[r]["mul"] = parts
                if needs.bitmul:  # a bit (arithmetic, binary), a mask and their product
                    bits = torch.randint(0, 2, (needs.bitmul,), generator=self.gen)
                    mask = self._rand(needs.bitmul)
                    for r, parts in enumerate(zip(self._add_split(bits),
                                                  [x & 1 for x in self._xor_split(bits)],
                                                  self._add_split(mask),
                                                  self._add_split(mask * bits))):
                        per_party[r]["bm"] = parts
                self.dealt[call] = per_party
            return self.dealt[call]


class _Comm:
    def __init__(self, hub: _Hub, rank: int) -> None:
        self.hub, self.rank = hub, rank

    def all_reduce(self, x: torch.Tensor, op=None) -> torch.Tensor:
        parts = self.hub.exchange(self.rank, x.clone())
        out = parts[0].clone()
        for p in parts[1:]:
            out = out ^ p if op is not None else out + p
        return out


class _SimMpc(compare._Mpc):
    """The real backend, fed by the in-memory dealer instead of CrypTen's provider."""

    def __init__(self, hub: _Hub, rank: int, call: int, needs: compare._Needs) -> None:
        self.comm, self.rank, self.world = _Comm(hub, rank), rank, hub.world
        mine = hub.deal(call, needs)[rank]
        self._and, self._dab, self._mul = mine.get("and"), mine.get("dab"), mine.get("mul")
        self._bm = mine.get("bm")
        self._and_at = self._mul_at = self._dab_at = self._bm_at = 0
        self._and_off = self._mul_off = self._dab_off = self._bm_off = None
        self.needs = needs


def _simulate(world: int, circuit, shares: list[torch.Tensor], seed: int = 0) -> list:
    """Run ``circuit(backend, shares[rank])`` in ``world`` threads; outputs by rank."""
    hub = _Hub(world, seed)
    counter = compare._Counting(0, world)
    circuit(counter, torch.zeros_like(shares[0]))
    out: list = [None] * world
    errors: list = []

    def party(rank: int) -> None:
        try:
            be = _SimMpc(hub, rank, 0, counter.needs)
            out[rank] = circuit(be, shares[rank])
            assert be.exhausted(), "dealer material not consumed as planned"
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            hub.barrier.abort()

    threads = [threading.Thread(target=party, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    out.append(hub.rounds)
    return out


def _share(values: torch.Tensor, world: int, gen: torch.Generator) -> list[torch.Tensor]:
    shares = [torch.randint(-(2 ** 63), 2 ** 63 - 1, values.shape, generator=gen,
                            dtype=torch.int64) for _ in range(world - 1)]
    return shares + [values - sum(shares, torch.zeros_like(values))]


def _open(shares: list[torch.Tensor]) -> torch.Tensor:
    return sum(shares[1:], shares[0].clone())


def _values(kind: str, rows: int, classes: int, owners: int, rng: np.random.Generator
            ) -> tuple[torch.Tensor, ValueRange | None]:
    """Encoded (16 fractional bits) aggregates of the kinds the engine compares, with many ties."""
    if kind == "votes":  # sums of one-hot votes
        votes = rng.integers(0, classes, size=(rows, owners))
        counts = np.zeros((rows, classes), dtype=np.int64)
        for j in range(owners):
            counts[np.arange(rows), votes[:, j]] += 1
        return torch.from_numpy(counts << 16), ValueRange(0, owners << 16, 16)
    if kind == "probs":  # sums of encoded probabilities, coarse so that ties happen
        vals = rng.integers(0, 6, size=(rows, classes)) * (owners << 16) // 5
        return torch.from_numpy(vals.astype(np.int64)), ValueRange(0, owners << 16)
    if kind == "signed":  # a range below zero, not starting at 0
        vals = rng.integers(-5, 3, size=(rows, classes)) * 40_000
        return torch.from_numpy(vals.astype(np.int64)), ValueRange(-200_000, 80_000)
    if kind == "wide":  # no bound: full 64-bit comparisons, huge values and ties
        vals = rng.integers(-3, 3, size=(rows, classes)) * (1 << 60) \
            + rng.integers(-2, 2, size=(rows, classes))
        return torch.from_numpy(vals.astype(np.int64)), None
    raise ValueError(kind)


SIM_CASES = [
    # world, kind, rows, classes, group size (None: cost model on LAN)
    (2, "votes", 9, 3, None), (3, "votes", 20, 10, None), (4, "votes", 20, 10, 2),
    (6, "votes", 15, 7, 3), (4, "probs", 25, 10, None), (5, "probs", 12, 17, 4),
    (3, "signed", 10, 5, None), (4, "wide", 8, 6, None), (2, "wide", 7, 4, 2),
    (17, "votes", 5, 10, None), (4, "votes", 3, 100, 2), (4, "probs", 2, 100, None),
    (3, "votes", 6, 2, None), (5, "signed", 7, 9, 5),
]


@pytest.mark.parametrize("world,kind,rows,classes,group", SIM_CASES,
                         ids=[f"P{c[0]}-{c[1]}-R{c[2]}-C{c[3]}-g{c[4]}" for c in SIM_CASES])
@pytest.mark.parametrize("outputs", ["index", "one_hot"])
def test_argmax_circuit_equals_plaintext(world, kind, rows, classes, group, outputs):
    rng = np.random.default_rng(world * 1000 + rows * 10 + classes)
    values, rng_bound = _values(kind, rows, classes, max(2, world - 1), rng)
    m, t, plan = compare.plan_argmax(rows, classes, rng_bound, world, LAN, group_size=group)
    circuit = compare.argmax_circuit(classes, m, t, plan.group_size, outputs)
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    out = _simulate(world, circuit, _share(values, world, gen))
    got = _open(out[:world])
    expected = plain.argmax_lowest(values)
    if outputs == "index":
        assert torch.equal(got, expected), (got, expected)
    else:
        assert torch.equal(got, torch.nn.functional.one_hot(expected, classes))


@pytest.mark.parametrize("world", [2, 3, 4, 6])
def test_ge_zero_circuit_on_bounded_and_full_values(world):
    gen = torch.Generator().manual_seed(world)
    rng_bound = ValueRange(0, 5 << 16, 16)
    diffs = torch.arange(-5, 6, dtype=torch.int64).repeat(7) << 16  # every difference, both signs
    m, t = rng_bound.comparison_bits()
    got = _open(_simulate(world, compare.ge_zero_circuit(m, t), _share(diffs, world, gen))[:world])
    assert torch.equal(got, (diffs >= 0).long())
    wide = torch.tensor([0, -1, 1, -(2 ** 62), 2 ** 62, 2 ** 63 - 1, -(2 ** 63), 12345, -54321])
    got = _open(_simulate(world, compare.ge_zero_circuit(64, 0), _share(wide, world, gen))[:world])
    assert torch.equal(got, (wide >= 0).long())


def test_random_argmax_cases_many():
    """Many small random cases (sizes, worlds, kinds, schedules) in one sweep."""
    rng = np.random.default_rng(2024)
    for trial in range(40):
        world = int(rng.choice([2, 3, 4, 5, 6]))
        kind = str(rng.choice(["votes", "probs", "signed", "wide"]))
        classes = int(rng.integers(2, 13))
        rows = int(rng.integers(1, 9))
        group = int(rng.integers(2, classes + 1))
        values, bound = _values(kind, rows, classes, max(2, world - 1), rng)
        m, t, plan = compare.plan_argmax(rows, classes, bound, world, group_size=group)
        circuit = compare.argmax_circuit(classes, m, t, plan.group_size, "index")
        gen = torch.Generator().manual_seed(trial)
        got = _open(_simulate(world, circuit, _share(values, world, gen), seed=trial)[:world])
        assert torch.equal(got, plain.argmax_lowest(values)), (trial, world, kind, values)


def test_sign_bits_drop_zero_low_bits_with_many_parties():
    """The low-bit carry trick with more parties than 2**q would allow without rounding up."""
    world = 9
    gen = torch.Generator().manual_seed(5)
    bound = ValueRange(0, 8 << 16, 16)
    diffs = torch.arange(-8, 9, dtype=torch.int64).repeat(5) << 16
    m, t = bound.comparison_bits()
    got = _open(_simulate(world, compare.ge_zero_circuit(m, t), _share(diffs, world, gen))[:world])
    assert torch.equal(got, (diffs >= 0).long())


# ---------------------------------------------------------------------------------------
# Pure helpers and the cost model
# ---------------------------------------------------------------------------------------
def test_pack_unpack_round_trip():
    gen = torch.Generator().manual_seed(1)
    for n in (1, 63, 64, 65, 200):
        bits = torch.randint(0, 2, (3, n), generator=gen)
        assert torch.equal(compare.unpack_bits(compare.pack_bits(bits), n), bits)
    vals = torch.randint(0, 31, (50,), generator=gen)
    words, per = compare._pack_fields(vals, 5)
    assert torch.equal(compare._unpack_fields(words, 5, per, 50), vals)


def test_value_range_bits():
    assert ValueRange(0, 3 << 16, 16).comparison_bits() == (3, 16)  # 3 votes: |d| <= 3 < 4
    assert ValueRange(0, 16 << 16, 16).comparison_bits() == (6, 16)
    assert ValueRange(0, 3 << 16).comparison_bits() == (19, 0)  # summed probabilities, N = 3
    assert ValueRange(-(1 << 40), 1 << 40).comparison_bits() == (43, 0)
    assert ValueRange(-(1 << 62), 1 << 62).comparison_bits() == (64, 0)
    with pytest.raises(ValueError):
        ValueRange(1, 0)


def test_cost_model_trades_rounds_for_bytes_with_latency():
    m, t = ValueRange(0, 3 << 16).comparison_bits()
    lan = compare.choose_group_size(32, 100, m, t, 4, LAN)
    wan = compare.choose_group_size(32, 100, m, t, 4, WAN)
    assert wan.rounds <= lan.rounds and wan.bytes_sent >= lan.bytes_sent
    satellite = compare.NetworkProfile("satellite", latency_s=1.0, bandwidth_bytes_s=1e9)
    assert compare.choose_group_size(32, 100, m, t, 4, satellite).group_size == 100  # all pairs
    thin = compare.NetworkProfile("thin", latency_s=1e-6, bandwidth_bytes_s=1e5)
    assert compare.choose_group_size(32, 100, m, t, 4, thin).group_size <= 3  # tournament
    assert compare.choose_group_size(32, 10, m, t, 4, LAN).group_size == 10


# ---------------------------------------------------------------------------------------
# Contribution ranges (mpc_fi.bounds)
# ---------------------------------------------------------------------------------------
class _Vote:
    def local_contribution(self, logits):
        return torch.nn.functional.one_hot(plain.argmax_lowest(logits), logits.shape[-1]).double()

    def combine(self, parts):
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total


class _Soft(_Vote):
    def local_contribution(self, logits):
        return torch.softmax(logits, dim=-1)


class _Weighted(_Vote):
    def combine(self, parts):
        return sum(p * 0.5 for p in parts)


def test_aggregate_ranges_of_votes_and_probabilities():
    votes, check = aggregate_range(_Vote(), num_owners=3, num_classes=10, precision_bits=16,
                                   logit_limit=2.0 ** 15)
    assert votes == ValueRange(0, 3 << 16, 16) and check.integer
    probs, check = aggregate_range(_Soft(), num_owners=5, num_classes=10, precision_bits=16,
                                   logit_limit=2.0 ** 15)
    assert probs == ValueRange(0, 5 << 16, 0) and not check.integer
    assert aggregate_range(_Weighted(), num_owners=3, num_classes=4, precision_bits=16,
                           logit_limit=2.0 ** 15) == (None, None)


def test_contribution_check_catches_values_outside_the_agreed_range():
    soft = contribution_range(_Soft(), 4, logit_limit=2.0 ** 15)
    assert soft == ContributionRange(0.0, 1.0, False)
    assert soft.problem(torch.tensor([[0.2, 0.8]])) is None
    assert "leave the range" in soft.problem(torch.tensor([[1.5, -0.5]]))
    votes = ContributionRange(0.0, 1.0, True)
    assert "not integer" in votes.problem(torch.tensor([[0.5, 0.5]]))


# ---------------------------------------------------------------------------------------
# Real parties: mpc_fi.secure on MPCTensors, both dealers, N = 2, 3, 5 owners (+ querier)
# ---------------------------------------------------------------------------------------
def _secure_party(rank: int, cases: list) -> list:
    from mpc_fi import secure
    from mpc_fi._crypten import load_crypten

    crypten = load_crypten()
    # an annotation describes these values only: an in-place update drops it
    y = secure.annotate(crypten.cryptensor(torch.zeros(2, 3), src=0), value_range=ValueRange(0, 1))
    kept = secure.hint_of(y).value_range is not None
    y += 5
    out = [(kept, secure.hint_of(y).value_range is None,
            secure.hint_of(y + 1).value_range is None)]
    for values, bound, group, kind in cases:
        x = crypten.cryptensor(torch.as_tensor(values, dtype=torch.float64) / 65536.0, src=0)
        if kind == "annotated":
            secure.annotate(x, value_range=bound, group_size=group)
            index = secure.argmax_index(x, values.shape[-1])
        elif kind == "one_hot":
            one_hot = secure.argmax_one_hot(x, values.shape[-1], value_range=bound,
                                            group_size=group)
            index = secure.one_hot_to_index(one_hot, values.shape[-1])
            out.append(one_hot.get_plain_text().numpy())
        else:
            index = secure.argmax_index(x, values.shape[-1], value_range=bound, group_size=group)
        out.append(index.get_plain_text().numpy())
    return out


REAL = [pytest.param(3, "ttp"), pytest.param(2, "insecure-party-dealer"),
        pytest.param(2, "ttp", marks=pytest.mark.slow),
        pytest.param(3, "insecure-party-dealer", marks=pytest.mark.slow),
        pytest.param(5, "ttp", marks=pytest.mark.slow),
        pytest.param(5, "insecure-party-dealer", marks=pytest.mark.slow)]


@pytest.mark.parametrize("owners,dealer", REAL)
def test_secure_argmax_in_real_parties(mpc, owners, dealer):
    """Two configurations in the default run; every N in {2, 3, 5} x dealer with ``-m slow``."""
    rng = np.random.default_rng(owners)
    cases = []
    for kind, rows, classes, group, how in [("votes", 40, 10, None, "annotated"),
                                            ("votes", 16, 10, 2, "one_hot"),
                                            ("probs", 24, 10, None, "plain"),
                                            ("probs", 12, 23, 3, "plain"),
                                            ("signed", 10, 4, None, "one_hot"),
                                            ("wide", 10, 6, None, "plain")]:
        values, bound = _values(kind, rows, classes, owners, rng)
        if kind == "wide":  # keep it inside CrypTen's encodable range
            values = (values >> 20) << 4
            bound = None
        cases.append((values.numpy(), bound, group, how))
    results = mpc(_secure_party, owners + 1, cases, dealer=dealer)
    outputs = iter(results[owners])
    assert next(outputs) == (True, True, True)
    for values, _, _, how in cases:
        expected = plain.argmax_lowest(torch.from_numpy(values)).numpy()
        if how == "one_hot":
            one_hot = next(outputs)
            assert np.array_equal(one_hot, np.eye(values.shape[-1])[expected])
        assert np.array_equal(np.round(next(outputs)).astype(np.int64), expected)


@pytest.mark.parametrize("world", [2, 4, 5])
@pytest.mark.parametrize("classes", [2, 7, 10, 33])
def test_tournament_max_is_a_row_value_within_its_slack(world, classes):
    """The softmax's shift: exact with no dropped bits, else one of the row's values at most
    levels * P * 2**drop below the maximum, for values anywhere in the bound (both signs, ties,
    near-ties inside the slack)."""
    gen = torch.Generator().manual_seed(world * 100 + classes)
    bound = 200 << 16
    rows = 40
    values = torch.randint(-bound, bound, (rows, classes), generator=gen, dtype=torch.int64)
    values[:5] = values[:5, :1]  # all equal
    values[5:10, 1:] = values[5:10, :1] - torch.randint(0, 64, (5, 1), generator=gen)  # near-ties
    vr = ValueRange(-bound, bound)
    m, _ = vr.comparison_bits()
    levels = max(1, (classes - 1).bit_length())
    for drop in (0, 6):
        out = _simulate(world, compare.max_circuit(m, drop), _share(values, world, gen))
        got = _open(out[:world]).view(rows)
        top = values.max(dim=1).values
        assert all(got[i] in values[i] for i in range(rows))
        if drop == 0:
            assert torch.equal(got, top)
        else:
            assert torch.all(got <= top) and torch.all(top - got < levels * world << drop)


@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_relu_circuit_is_exact_on_the_bits_of_its_bound_with_one_bit_product(world):
    """max(x, 0) from the sign bit and one bit product (a masked bit and a masked value per
    element): exact for values of both signs anywhere in the bound, zero included; with
    dropped low bits only values in [0, P * 2**drop) may come out as 0."""
    gen = torch.Generator().manual_seed(world + 40)
    bound = 64 << 16
    x = torch.randint(-bound, bound, (300,), generator=gen, dtype=torch.int64)
    x[:6] = torch.tensor([0, 1, -1, bound - 1, -bound + 1, 5])
    m, _ = ValueRange(0, bound).comparison_bits()
    got = _open(_simulate(world, compare.relu_circuit(m), _share(x, world, gen))[:world])
    assert torch.equal(got, x.clamp(min=0))
    drop = 5
    got = _open(_simulate(world, compare.relu_circuit(m, drop), _share(x, world, gen))[:world])
    exact = (x < 0) | (x >= world << drop)
    assert torch.equal(got[exact], x.clamp(min=0)[exact])
    assert torch.all((got[~exact] == 0) | (got[~exact] == x[~exact]))
    counter = compare._Counting(0, world)
    compare.relu_circuit(m)(counter, torch.zeros_like(x))
    assert counter.needs.bitmul == x.numel() and counter.needs.mul == 0


def _relu_party(rank: int, values: np.ndarray) -> list:
    from mpc_fi import compare
    from mpc_fi._crypten import load_crypten

    crypten = load_crypten()
    x = crypten.cryptensor(torch.as_tensor(values), src=0)
    with compare.bounded(40.0):
        bounded = x.relu().get_plain_text().numpy()
    return [x.relu().get_plain_text().numpy(), bounded]


@pytest.mark.parametrize("world, dealer", [(3, "ttp"), (2, "insecure-party-dealer")])
def test_relu_on_shares_with_either_dealer(mpc, world, dealer):
    """MPCTensor.relu (the sign bit and one bit product, B2A_mul from the TTP dealer or from
    party 0) equals max(x, 0), with 64-bit comparisons and inside a bound."""
    values = np.random.default_rng(world).uniform(-30, 30, size=(5, 7))
    values[0, :3] = [0.0, 1e-4, -1e-4]
    full, bounded = mpc(_relu_party, world, values, dealer=dealer)[0]
    for got in (full, bounded):
        assert np.abs(got - np.maximum(values, 0)).max() < 1e-4
