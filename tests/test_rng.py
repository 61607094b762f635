"""The counter-based stream: Philox4x32-10 against Random123's known answers, and the u16 layout."""

import torch

from dropkit import rng


def _block(counter, key):
    return [int(w) for w in rng.philox4x32_block(tuple(torch.tensor([c]) for c in counter), key)]


def test_philox_matches_random123_known_answers():
    assert _block((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert _block((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert _block((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_counter_and_seed_split_into_words():
    seed, counter = (7 << 32) | 3, (5 << 32) | 9
    words = [int(w) for w in rng.philox4x32(torch.tensor([counter]), seed)]
    assert words == _block((9, 5, 0, 0), (3, 7))


def test_u16_layout_takes_eight_values_per_counter_low_half_first():
    seed, offset = 1234, 10
    values = rng.uniform16(seed, offset, 20)
    for i in range(20):
        words = rng.philox4x32(torch.tensor([offset + i // 8]), seed)
        word = int(words[(i // 2) % 4])
        assert int(values[i]) == (word >> (16 * (i % 2))) & 0xFFFF


def test_u16_stream_is_a_pure_function_of_seed_offset_index():
    whole = rng.uniform16(99, 0, 64)
    assert torch.equal(rng.uniform16(99, 4, 32), whole[32:])
    assert not torch.equal(rng.uniform16(98, 0, 64), whole)


def test_u16_values_are_uniform():
    n = 1 << 18
    counts = torch.bincount(rng.uniform16(5, 0, n) >> 12, minlength=16).double()
    expected = n / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 37.7  # chi-square, 15 degrees of freedom, p = 0.001


def test_normal_stream_moments():
    z = rng.normal(3, 0, 200_000)
    assert abs(float(z.mean())) < 6 / 200_000**0.5
    assert abs(float(z.var()) - 1) < 6 * (2 / 200_000) ** 0.5
