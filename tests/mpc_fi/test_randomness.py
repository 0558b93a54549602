"""Every random value that masks a secret comes from the CSPRNG (AES-256-CTR, 256-bit keys).

What is shown here:

* the CSPRNG itself: full 64-bit ring elements, k-bit values, counter addressing (a slice can be
  regenerated from key and offset), purposes that never coincide, keys below 128 bits refused;
* torch's generator (what CrypTen used) keeps 32 bits of a seed; ours keeps every bit;
* the seed-recovery attack: on CrypTen's own sampler with a ``torch.Generator`` whose seed is cut
  to 18 bits, an attacker who sees two masks finds the seed and predicts every later mask; the
  same search finds nothing against a stream the engine sets up (there is no seed to search:
  the key is 256 bits from the OS);
* inside every party of both providers (TTP dealer and the party dealer), every generator CrypTen
  would mask with is a CSPRNG, the patch handle reports every patch live, and a
  ``torch.Generator`` that reached a sampler would raise instead of masking.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from mpc_fi import crypten_rng
from mpc_fi._crypten import load_crypten, patches
from mpc_fi.csprng import CSPRNG, key_to_tensor, new_key, tensor_to_key
from mpc_fi.errors import InsecureSettingWarning

SEARCH_BITS = 18


def seeded(seed: int, purpose: str = "t") -> CSPRNG:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureSettingWarning)
        return CSPRNG.from_seed(seed, purpose)


def test_ring_elements_cover_all_64_bits():
    values = CSPRNG(new_key(), purpose="t").ring((4096,))
    assert values.dtype == torch.int64 and values.shape == (4096,)
    assert (values < 0).any() and (values > 0).any()
    words = values.numpy().view(np.uint64)
    for bit in (0, 31, 32, 62, 63):  # each bit position is set in about half of the values
        ones = int(((words >> np.uint64(bit)) & np.uint64(1)).sum())
        assert 1700 < ones < 2400, (bit, ones)


def test_kbit_values_stay_in_range():
    stream = CSPRNG(new_key(), purpose="t")
    one = stream.kbits((2000,), 1)
    assert set(one.unique().tolist()) == {0, 1}
    twenty = stream.kbits((2000,), 20)
    assert int(twenty.min()) >= 0 and int(twenty.max()) < 2 ** 20
    assert int(twenty.max()) > 2 ** 19


def test_same_key_and_purpose_agree_and_slices_regenerate():
    key = new_key()
    a, b = CSPRNG(key, purpose="przs"), CSPRNG(key, purpose="przs")
    first = a.ring((5, 3))
    assert torch.equal(first, b.ring(15).view(5, 3))  # same draws in the same order
    later = a.ring(7)
    assert torch.equal(CSPRNG(key, purpose="przs").at(15 * 8).ring(7), later)
    assert torch.equal(a.at(8 * 3 + 0).ring(2), first.flatten()[3:5])
    assert not torch.equal(CSPRNG(key, purpose="other").ring(15), first.flatten())
    assert not torch.equal(a.derive("x").ring(4), a.derive("y").ring(4))


def test_unaligned_offsets_regenerate_too():
    stream = CSPRNG(new_key(), purpose="t")
    raw = stream.random_bytes(100)
    assert stream.at(13).random_bytes(40) == raw[13:53]


def test_short_keys_are_refused():
    with pytest.raises(ValueError, match="128 bits"):
        CSPRNG(os.urandom(15), purpose="t")


def test_keys_travel_as_four_words():
    key = new_key()
    assert tensor_to_key(key_to_tensor(key)) == key


def test_torch_keeps_32_bits_of_a_seed_and_the_csprng_keeps_all():
    s = 0x1234_5678_9ABC
    g1, g2 = torch.Generator().manual_seed(s), torch.Generator().manual_seed(s + 2 ** 32)
    assert torch.equal(torch.randint(0, 2 ** 62, (8,), generator=g1),
                       torch.randint(0, 2 ** 62, (8,), generator=g2))  # the flaw, for the record
    assert not torch.equal(seeded(s).ring(8), seeded(s + 2 ** 32).ring(8))
    assert not torch.equal(seeded(s).ring(8), seeded(s + 2 ** 63).ring(8))


def test_fixed_seeds_warn():
    with pytest.warns(InsecureSettingWarning, match="predictable"):
        CSPRNG.from_seed(1, "t")


def test_normal_samples_have_the_right_moments():
    z = seeded(7, "dp-noise").normal((40000,), 3.0)
    assert z.dtype == torch.float64
    assert abs(float(z.mean())) < 0.06 and abs(float(z.std()) - 3.0) < 0.06
    assert torch.isfinite(z).all()


def _search(observed: torch.Tensor, sampler) -> int | None:
    """The attacker: try every seed below 2**SEARCH_BITS; return the one that explains ``observed``."""
    g = torch.Generator()
    for seed in range(2 ** SEARCH_BITS):
        if torch.equal(sampler(g.manual_seed(seed)), observed):
            return seed
    return None


def test_seed_recovery_succeeds_on_crypten_generators_and_finds_nothing_on_ours():
    load_crypten()
    crypten_sampler = patches().originals["crypten.common.rng.generate_random_ring_element"]

    def sample(generator):
        return crypten_sampler((2,), generator=generator)

    # Old path: CrypTen's sampler on a torch.Generator; the seed cut to SEARCH_BITS bits (any
    # 64-bit seed is already cut to 32 by MT19937; fewer bits keep the search short here).
    secret_seed = int.from_bytes(os.urandom(8), "big") % 2 ** SEARCH_BITS
    victim = torch.Generator().manual_seed(secret_seed + (7 << 40))  # high bits are ignored
    observed = sample(victim)
    found = _search(observed, sample)
    assert found == secret_seed
    predicted = torch.Generator().manual_seed(found)
    sample(predicted)
    assert torch.equal(sample(predicted), sample(victim))  # every later mask is known

    # New path: the engine's stream for the same purpose. No seed reaches it; the same search
    # (and the same search through the CSPRNG's test-only seed derivation) explains nothing.
    ours = CSPRNG(new_key(), purpose=crypten_rng.PRZS)
    observed = ours.ring((2,))
    assert _search(observed, sample) is None
    assert not any(torch.equal(seeded(s, crypten_rng.PRZS).ring((2,)), observed)
                   for s in range(2 ** 12))


def test_a_torch_generator_reaching_a_sampler_raises():
    load_crypten()
    with pytest.raises(crypten_rng.InsecureRandomnessError, match="Generator"):
        crypten_rng.generate_random_ring_element((3,), generator=torch.Generator())
    with pytest.raises(crypten_rng.InsecureRandomnessError, match="Generator"):
        crypten_rng.generate_kbit_random_tensor((3,), bitlength=1, generator=torch.Generator())


def _party_randomness(rank: int) -> dict:
    import torch

    from mpc_fi import crypten_rng
    from mpc_fi._crypten import load_crypten, patches

    crypten = load_crypten()
    x = crypten.cryptensor(torch.arange(6, dtype=torch.float64), src=0)
    y = (x * x).get_plain_text().tolist()  # a Beaver multiplication: dealer material in use
    return {"generators": crypten_rng.generators_in_use(), "patches": patches().installed(),
            "square": y, "rank": rank}


@pytest.mark.parametrize("dealer", ["ttp", "insecure-party-dealer"])
def test_every_party_masks_with_the_csprng(mpc, dealer):
    results = mpc(_party_randomness, 3, dealer=dealer)
    for r in results:
        assert r["patches"] and all(r["patches"].values()), r["patches"]
        kinds = r["generators"]
        assert {k for k in kinds if k.startswith("crypten.generators")}  # prev/next/local/global
        assert set(kinds.values()) == {"CSPRNG"}, kinds
        assert ("TTPClient.generator" in kinds) == (dealer == "ttp")
        np.testing.assert_allclose(r["square"], [float(i * i) for i in range(6)], atol=1e-3)


def test_every_process_of_a_federation_logs_csprng_streams(federation_factory, tmp_path):
    from mpc_fi import Federation

    fed, _ = federation_factory(num_owners=2, num_classes=3)
    run_dir = tmp_path / "run"
    Federation(fed, run_dir=run_dir).run(np.random.default_rng(0).uniform(-1, 1, (4, 6)))
    logs = {p.name: p.read_text() for p in run_dir.glob("party-*.log")}
    assert len(logs) == 4  # two owners, the querier, the dealer
    everything = "csprng, fast-comparisons"
    for name, text in logs.items():
        assert everything in text.split("patches live: ")[1].split("\n")[0], name
        if "dealer" in name:
            assert "randomness: dealer streams CSPRNG" in text
        else:
            assert "randomness: CSPRNG (" in text, name


def test_a_large_draw_equals_the_same_bytes_drawn_in_pieces():
    key = new_key()
    whole = CSPRNG(key, purpose="t").ring((3_000_000,))  # 24 MB: drawn in 16 MiB chunks
    pieces = CSPRNG(key, purpose="t")
    assert torch.equal(whole, torch.cat([pieces.ring((1_000_000,)) for _ in range(3)]))
    assert torch.equal(CSPRNG(key, purpose="t").at(8 * 2_999_990).ring((10,)), whole[-10:])
