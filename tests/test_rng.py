"""The counter-based stream: Philox4x32-10 against Random123's known answers, and the mask streams' layout."""

import pytest
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


def test_width_16_layout_takes_eight_values_per_counter_low_half_first():
    seed, offset = 1234, 10
    values = rng.uniform(seed, offset, 20, 16)
    for i in range(20):
        words = rng.philox4x32(torch.tensor([offset + i // 8]), seed)
        word = int(words[(i // 2) % 4])
        assert int(values[i]) == (word >> (16 * (i % 2))) & 0xFFFF


@pytest.mark.parametrize("width", rng.DRAW_WIDTHS)
def test_every_width_reads_the_128_bits_of_a_counter_low_bits_first(width):
    seed, offset, per_counter = 77, 3, 128 // width
    values = rng.uniform(seed, offset, 3 * per_counter + 5, width)
    for i in range(len(values)):
        words = [int(w) for w in rng.philox4x32(torch.tensor([offset + i // per_counter]), seed)]
        bits = sum(w << (32 * k) for k, w in enumerate(words))  # the four words end to end, word 0 lowest
        assert int(values[i]) == (bits >> (width * (i % per_counter))) & ((1 << width) - 1)


@pytest.mark.parametrize("width", rng.DRAW_WIDTHS)
def test_stream_is_a_pure_function_of_seed_offset_index(width):
    per_counter = 128 // width
    whole = rng.uniform(99, 0, 8 * per_counter, width)
    assert torch.equal(rng.uniform(99, 4, 4 * per_counter, width), whole[4 * per_counter:])
    assert not torch.equal(rng.uniform(98, 0, 8 * per_counter, width), whole)


@pytest.mark.parametrize("width", rng.DRAW_WIDTHS)
def test_values_are_uniform(width):
    n, bins = 1 << 18, min(16, 1 << width)
    counts = torch.bincount(rng.uniform(5, 0, n, width) >> (width - bins.bit_length() + 1), minlength=bins).double()
    expected = n / bins
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < {1: 10.83, 3: 16.27, 15: 37.7}[bins - 1]  # chi-square upper quantiles at p = 0.001


@pytest.mark.parametrize(("p", "width"), [(0.0, 1), (0.5, 1), (1.0, 1), (0.25, 2), (0.75, 2), (0.125, 4),
                                          (0.375, 4), (1 / 256, 8), (0.1, 16), (0.3, 16), (1 / 65536, 16)])
def test_keep_threshold_spends_the_fewest_bits_that_keep_the_quantised_rate(p, width):
    got_width, thr = rng.keep_threshold(p)
    assert got_width == width
    assert thr / 2**width == rng.threshold(p) / rng.THRESHOLD_SCALE  # the same drop probability
    with pytest.raises(ValueError, match="width must be one of"):
        rng.uniform(0, 0, 4, 3)


def test_normal_stream_moments():
    z = rng.normal(3, 0, 200_000)
    assert abs(float(z.mean())) < 6 / 200_000**0.5
    assert abs(float(z.var()) - 1) < 6 * (2 / 200_000) ** 0.5


@pytest.fixture
def eight_bit_rates():
    previous = rng.set_rate_bits(8)
    yield
    rng.set_rate_bits(previous)


def test_eight_bit_rates_round_to_a_256th_and_draw_8_bits(eight_bit_rates):
    assert rng.rate_bits() == 8
    assert rng.keep_threshold(0.1) == (8, 26)  # 0.1 * 256 = 25.6 -> 26: drops at 0.1016
    assert rng.keep_threshold(0.5) == (1, 1) and rng.keep_threshold(0.3) == (8, 77)
    for p in [0.001, 0.1, 1 / 3, 0.5, 0.999]:
        assert abs(rng.threshold(p) / rng.THRESHOLD_SCALE - p) <= 0.5 / 256
    assert rng.threshold(0.0) == 0 and rng.threshold(1.0) == rng.THRESHOLD_SCALE


def test_rate_bits_default_to_16_and_refuse_other_values():
    assert rng.rate_bits() == 16 and rng.keep_threshold(0.1) == (16, 6554)
    with pytest.raises(ValueError, match="bits must be one of 8, 16, got 12"):
        rng.set_rate_bits(12)
    assert rng.rate_bits() == 16
