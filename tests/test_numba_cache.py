"""The kernels' on-disk cache: private to its user, dropkit's files only, loaded by a new process."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from numba.core import caching

from dropkit.kernels import numba_cache


@pytest.fixture
def cache_env(monkeypatch, tmp_path):
    monkeypatch.setenv(numba_cache.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_directory_is_created_owner_only(cache_env):
    assert numba_cache.enable()
    for folder in (cache_env, cache_env / "numba"):
        assert stat.S_IMODE(folder.stat().st_mode) & 0o077 == 0, oct(folder.stat().st_mode)
    assert numba_cache.cache_dir() == cache_env / "numba"


@pytest.mark.parametrize("where", ["root", "leaf"])
def test_a_directory_others_may_write_is_refused_with_a_warning(cache_env, where):
    (cache_env / "numba").mkdir(parents=True)
    os.chmod(cache_env if where == "root" else cache_env / "numba", 0o777)
    with pytest.warns(RuntimeWarning, match="other users may write"):
        assert not numba_cache.enable()


def test_the_default_directory_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv(numba_cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert numba_cache.cache_dir() == tmp_path / "dropkit" / "numba"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert numba_cache.cache_dir() == Path.home() / ".cache" / "dropkit" / "numba"


def test_the_locator_answers_for_dropkits_files_only(cache_env):
    numba_cache.enable()

    def f():
        return 1

    assert numba_cache.DropkitCacheLocator.from_function(f, __file__) is None
    kernel_file = str(Path(numba_cache.__file__).with_name("cpu.py"))
    locator = numba_cache.DropkitCacheLocator.from_function(f, kernel_file)
    assert Path(locator.get_cache_path()) == cache_env / "numba" / "kernels_cpu"
    # numba's own setting is untouched; the locator is tried first, for dropkit's files
    assert caching.CacheImpl._locator_classes[0] is numba_cache.DropkitCacheLocator
    from numba import config
    assert not config.CACHE_DIR or config.CACHE_DIR == os.environ.get("NUMBA_CACHE_DIR")


FIRST_CALL = textwrap.dedent("""
    import json, torch, dropkit
    from dropkit.kernels import cpu
    x = torch.ones(64)
    dropkit.dropout(x, 0.3, training=True, seed=1)
    stats = cpu.masked_seed.stats
    print(json.dumps({"hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values())}))
""")


#: warmup over float32 only: the next process's float32 call is the one checked, and each dtype
#: compiles for seconds (every dtype's warmup is checked in-process below)
WARMUP_FLOAT32 = "import torch; from dropkit import kernels; kernels._NATIVE = (torch.float32,); kernels.warmup()"


@pytest.mark.slow
def test_a_new_process_loads_the_kernels_that_warmup_compiled(cache_env):
    env = {**os.environ, numba_cache.CACHE_ENV: str(cache_env)}
    warm = subprocess.run([sys.executable, "-c", WARMUP_FLOAT32], env=env, capture_output=True, text=True)
    assert warm.returncode == 0, warm.stderr
    assert any((cache_env / "numba" / "kernels_cpu").glob("*.nbi"))
    first = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().endswith('"misses": 0}'), first.stdout
    assert '"hits": 0,' not in first.stdout


def test_warmup_compiles_every_kernel_for_every_dtype():
    """Every dtype's warmup runs (the test above warms float32 only, in a process of its own), and
    leaves each kernel compiled for each dtype's arrays (bfloat16 as its uint16 bits)."""
    from dropkit import kernels
    from dropkit.kernels import cpu

    assert kernels.warmup() >= 0
    for kernel in (cpu.masked_seed, cpu.masked_bits, cpu.gaussian):
        assert {str(signature[0].dtype) for signature in kernel.signatures} >= {"float32", "float64", "uint16"}
    assert cpu.keep_mask.signatures
