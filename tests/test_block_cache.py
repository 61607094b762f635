"""The cache of large output blocks: a block is handed out again only once nothing uses it, the
limit holds, the cache can be turned off, and the kernels give the same numbers from reused memory."""

import os
import threading

import pytest
import torch

from dropkit import block_cache, kernels
from dropkit import functional as DF

BLOCK = 16 * 1024  # bytes of the test outputs: the threshold is lowered to this


@pytest.fixture
def cache(monkeypatch):
    """The cache with its threshold at :data:`BLOCK` bytes and a limit of 1 MiB, empty."""
    monkeypatch.setattr(block_cache, "MIN_BYTES", BLOCK)
    monkeypatch.setenv(block_cache.ENV, "1")
    block_cache.limit_bytes.cache_clear()
    block_cache.empty_cache()
    yield block_cache
    block_cache.empty_cache()
    block_cache.limit_bytes.cache_clear()


def test_a_freed_block_is_handed_out_again_and_a_live_one_never(cache):
    x = torch.randn(BLOCK // 4)
    first = cache.empty_like(x)
    address = first.data_ptr()
    second = cache.empty_like(x)
    assert second.data_ptr() != address  # both live: distinct memory
    del first
    assert cache.cached_bytes() == BLOCK
    third = cache.empty_like(x)
    assert third.data_ptr() == address and cache.cached_bytes() == 0
    del second, third
    assert cache.cached_bytes() == 2 * BLOCK


def test_a_view_keeps_its_block_out_of_the_cache(cache):
    out = cache.empty_like(torch.randn(BLOCK // 4))
    view = out.view(64, -1)[1:]
    del out
    assert cache.cached_bytes() == 0
    del view
    assert cache.cached_bytes() == BLOCK


def test_outputs_have_the_dtype_and_shape_asked_and_hold_what_is_written(cache):
    x = torch.randn(64, BLOCK // 64).to(torch.bfloat16)
    out = cache.empty_like(x.t())
    assert out.dtype == torch.bfloat16 and out.shape == (BLOCK // 64, 64) and out.is_contiguous()
    out.copy_(x.t())
    assert torch.equal(out, x.t())
    with pytest.raises(RuntimeError, match="not resizable"):  # the documented difference
        out.resize_(2 * out.numel())


def test_past_the_limit_the_least_recently_freed_blocks_go(cache):
    x = torch.randn(2**18 // 4)  # 256 KiB: five of them, four fit the 1 MiB limit
    outs = [cache.empty_like(x) for _ in range(5)]
    del outs
    assert cache.cached_bytes() == 2**20
    other = cache.empty_like(torch.randn(2**17 // 4))  # another size, freed last: it stays
    address = other.data_ptr()
    del other
    assert cache.cached_bytes() == 2**20 - 2**18 + 2**17
    assert cache.empty_like(torch.randn(2**17 // 4)).data_ptr() == address
    cache.empty_cache()
    assert cache.cached_bytes() == 0


def test_a_block_freed_on_another_thread_comes_back(cache):
    held = [cache.empty_like(torch.randn(BLOCK // 4))]
    worker = threading.Thread(target=held.clear)
    worker.start()
    worker.join()
    assert cache.cached_bytes() == BLOCK


def test_small_and_non_cpu_outputs_do_not_use_the_cache(cache):
    small = cache.empty_like(torch.randn(BLOCK // 8))
    meta = cache.empty_like(torch.empty(BLOCK, device="meta"))
    assert meta.device.type == "meta"
    small.resize_(small.numel() + 1)  # an ordinary torch allocation
    del small, meta
    assert cache.cached_bytes() == 0


def test_the_cache_can_be_turned_off(cache, monkeypatch):
    monkeypatch.setenv(block_cache.ENV, "0")
    cache.limit_bytes.cache_clear()
    out = cache.empty_like(torch.randn(BLOCK // 4))
    out.resize_(out.numel() + 1)
    del out
    assert cache.cached_bytes() == 0


@pytest.mark.parametrize("value", ["lots", "-1", "1.5"])
def test_a_bad_limit_names_the_variable(cache, monkeypatch, value):
    monkeypatch.setenv(block_cache.ENV, value)
    cache.limit_bytes.cache_clear()
    with pytest.raises(ValueError, match="DROPKIT_BLOCK_CACHE must be a whole number of MiB >= 0"):
        cache.limit_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_writing_into_reused_blocks_match_the_reference(cache, dtype):
    x = torch.randn(BLOCK).to(dtype)  # 32 or 64 KiB: from the cache
    keep = kernels.reference.keep_mask(5, 0.3, tuple(x.shape))
    expected = kernels.reference.masked(x, keep, "dropout", 0.3)
    first, _ = kernels.masked(x, 5, 0.3, "dropout")
    address = first.data_ptr()
    first.fill_(float("nan"))  # stale contents must be overwritten
    del first
    again, _ = kernels.masked(x, 5, 0.3, "dropout")
    assert again.data_ptr() == address
    assert torch.equal(again, expected)


def test_seed_mode_gradient_from_a_reused_block_regenerates_the_mask(cache):
    x = torch.randn(BLOCK, requires_grad=True)
    grads = []
    for _ in range(2):  # the second pass writes forward and backward into the first pass's blocks
        DF.dropout(x, 0.5, training=True, seed=11).backward(torch.ones_like(x))
        grads.append(x.grad)
        x.grad = None
    keep = kernels.reference.keep_mask(11, 0.5, tuple(x.shape))
    assert torch.equal(grads[0], keep * 2.0) and torch.equal(grads[1], grads[0])


def test_the_default_limit_is_a_gibibyte_or_a_sixteenth_of_the_memory(monkeypatch):
    monkeypatch.delenv(block_cache.ENV, raising=False)
    block_cache.limit_bytes.cache_clear()
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        assert block_cache.limit_bytes() == min(2**30, memory // 16 // 2**20 * 2**20)
    finally:
        block_cache.limit_bytes.cache_clear()
