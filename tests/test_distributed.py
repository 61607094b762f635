"""Data-parallel training on torch.distributed (gloo, CPU): equivalence, per-rank masks,
repeatability, a killed rank that stops the job (naming it) and the run's resume, and no hang when
a rank fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import dropkit
from dropkit import rng
from dropkit.lab import distributed
from dropkit.lab.atomic_files import atomic_write_text
from dropkit.lab.train import MASK_STREAM, Callback, TrainConfig, train

SLICE = ["--limit-train", "6000", "--limit-test", "2000", "--val-size", "500", "--p", "0.5", "--quiet"]
NOISY_KEYS = {"seconds", "eval_seconds", "peak_rss_mib", "saved_mib"}


def _dropkit(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dropkit", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


def _train(out: Path, *args: str) -> list[dict]:
    proc = _dropkit(*SLICE, "--out", str(out), *args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return _metrics(out / "p=0.5")


def _stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in NOISY_KEYS} for row in rows]


#: the settings of the command lines above (SLICE, two epochs), for runs launched from this process
CONFIG = TrainConfig(p=0.5, epochs=2, limit_train=6000, limit_test=2000, val_size=500)


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> list[dict]:
    """A run of CONFIG on 2 processes, launched from here (the command line's ``--nproc`` runs in
    the killed run's resume)."""
    out = tmp_path_factory.mktemp("ddp") / "p=0.5"
    distributed.launch(2, _train_history, CONFIG, str(out), [])
    return _metrics(out)


@pytest.mark.slow
def test_two_processes_match_one_at_the_same_global_batch(two_process_run, tmp_path):
    single = train(CONFIG, tmp_path / "one", quiet=True).history
    assert len(two_process_run) == len(single) == 2
    assert abs(two_process_run[-1]["test_acc"] - single[-1]["test_acc"]) <= 0.01


class KillRankOneInEpochTwo(Callback):
    """SIGKILLs rank 1's process after its first step of the second epoch, as a crash or an OOM
    kill would: the job is past its first checkpoint and inside the next epoch, every time."""

    def on_step_end(self, model, step, epoch):
        if epoch == 1 and distributed.rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)


def _train_history(config: TrainConfig, out: str, callbacks: list) -> list[dict]:
    return train(config, out, quiet=True, callbacks=callbacks).history


@pytest.mark.slow
def test_a_rank_killed_mid_epoch_stops_the_job_naming_it_and_the_run_resumes_to_the_same_end(
        two_process_run, tmp_path):
    """Also the repeatability of a data-parallel run: the killed run's first epoch, and the end of
    its resumed run, are those of the fixture's run (same seed and world size, another launch)."""
    with pytest.raises(distributed.WorkerFailed, match=r"rank 1 \(pid \d+\) failed \(exit code -9\) without raising"):
        distributed.launch(2, _train_history, CONFIG, str(tmp_path / "p=0.5"), [KillRankOneInEpochTwo()])
    assert _stable(_metrics(tmp_path / "p=0.5")) == _stable(two_process_run[:1])
    resumed = _train(tmp_path, "--epochs", "2", "--nproc", "2", "--resume")  # refuses another config
    assert _stable(resumed) == _stable(two_process_run)


def _masks_then_rank_one_raises(seed: int, out: str) -> None:
    """Draw a mask the way dropkit.lab.train seeds each rank's first epoch and save every rank's
    (gathered on rank 0) to ``out``; then rank 1 raises while rank 0 waits for it."""
    torch.manual_seed(rng.derive_seed(seed, MASK_STREAM, distributed.rank(), 1))
    mask = dropkit.dropout(torch.ones(4096), 0.5, training=True) != 0
    gathered = [None] * distributed.world_size()
    dist.all_gather_object(gathered, mask)
    if distributed.is_main():
        torch.save(gathered, out)
    distributed.barrier()  # the masks are saved before rank 1 fails
    if distributed.rank() == 1:
        raise RuntimeError("injected failure")
    distributed.barrier()  # rank 0 would wait here forever for its dead peer


@pytest.mark.slow
def test_ranks_draw_different_masks_and_a_rank_that_raises_stops_the_job_naming_it(tmp_path):
    """Both in one launch, whose processes' start-up is most of the cost."""
    with pytest.raises(distributed.WorkerFailed, match=r"rank 1 \(pid \d+\) failed.*injected failure"):
        distributed.launch(2, _masks_then_rank_one_raises, 0, str(tmp_path / "masks.pt"))
    masks = torch.load(tmp_path / "masks.pt")
    assert len(masks) == 2
    assert not torch.equal(masks[0], masks[1])
    assert 0.4 < float(masks[0].float().mean()) < 0.6


def _torch_failure(pid, exitcode=1):
    return SimpleNamespace(timestamp=1_700_000_000, pid=pid, exitcode=exitcode, message={})


def _raised(pid, time_ns, error, peer_lost):
    return {"pid": pid, "time_ns": time_ns, "error": error, "peer_lost": peer_lost}


def test_the_rank_named_is_the_cause_whichever_dead_rank_torch_found():
    started = {0: 10, 1: 11}
    lost = _raised(10, 2_000, "RuntimeError: [gloo/pair.cc] Connection closed by peer", True)
    injected = _raised(11, 1_000, "RuntimeError: injected failure", False)
    # torch kept only rank 0, which failed on rank 1's closed connection
    message = distributed._describe_failure({0: _torch_failure(10)}, started, {0: lost, 1: injected})
    assert message == ("distributed run stopped: rank 1 (pid 11) failed: RuntimeError: injected failure; "
                       "then ranks [0] stopped")
    # an error of the rank's own wins over a lost peer even when it was written later
    late = dict(injected, time_ns=3_000)
    assert "rank 1 (pid 11) failed: RuntimeError: injected" in distributed._describe_failure(
        {0: _torch_failure(10)}, started, {0: lost, 1: late})
    # rank 1 was killed: torch saw it die without raising
    assert distributed._describe_failure({1: _torch_failure(11, -9)}, started, {0: lost}).startswith(
        "distributed run stopped: rank 1 (pid 11) failed (exit code -9) without raising")
    # rank 1 was killed but torch found rank 0 first: rank 1's start record names it
    assert distributed._describe_failure({0: _torch_failure(10)}, started, {0: lost}).startswith(
        "distributed run stopped: rank 1 (pid 11) failed without raising (killed?); rank 0 then lost its peer")


def test_failure_records_are_read_whole_or_not_at_all(tmp_path):
    atomic_write_text(tmp_path / "started-0", json.dumps({"pid": 10}))
    atomic_write_text(tmp_path / "raised-0", json.dumps(_raised(10, 5, "ValueError: x", False)))
    (tmp_path / ".raised-1.tmp").write_text('{"pid": 1')  # a rank that died mid-write
    assert distributed._read_records(str(tmp_path)) == ({0: 10}, {0: _raised(10, 5, "ValueError: x", False)})
