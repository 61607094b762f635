"""Data-parallel runs on torch.distributed: launching workers, the process group, reductions.

A run of N processes trains one model replica per process under ``DistributedDataParallel``:
every step, each rank takes its slice of the same global batch (so N processes see the batches a
single process would, split N ways), gradients are averaged by DDP's all-reduce, and each rank
draws its own dropout masks from ``derive_seed(seed, rank)``. Identical masks on all ranks would
silently waste the parallelism: the N slices would be regularised by one noise pattern.

Launching uses torch's elastic launcher (the machinery behind ``torchrun``) with no restarts:
when any worker raises or dies, the launcher stops the others and raises an error naming the
failed rank, so a job never hangs on a dead peer. Collectives also carry a timeout
(:data:`COLLECTIVE_TIMEOUT`) for jobs started across machines by ``torchrun``, where a peer can
vanish without its launcher noticing.

The backend is gloo on CPU and NCCL when CUDA is available.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

#: how long a collective waits for a missing peer before failing the job
COLLECTIVE_TIMEOUT = timedelta(seconds=45)
#: how often the launcher checks its workers (seconds): a dead rank is noticed this fast
MONITOR_INTERVAL = 0.5

T = TypeVar("T")


def rank() -> int:
    """This process's rank (0 outside a distributed run)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes in the run (1 outside a distributed run)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on the one process that prints and writes files (rank 0)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True inside a worker that a launcher (``torchrun`` or :func:`launch`) started."""
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def process_group() -> Iterator[None]:
    """Join the process group described by the launcher's environment variables; leave it on exit.

    On an exception the group is not torn down: a graceful teardown waits on peers, while exiting
    at once lets the launcher see this rank fail first and name it as the cause.
    """
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    yield
    dist.destroy_process_group()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (the values themselves outside a run)."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def barrier() -> None:
    """Wait for every rank (no-op outside a distributed run)."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (``obj`` itself outside a distributed run)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WorkerFailed(RuntimeError):
    """A worker of a distributed run raised or died; the message names its rank."""


@record
def _worker(fn: Callable[..., T], args: tuple[Any, ...], failure_dir: str) -> T:
    share_cores()
    try:
        with process_group():
            return fn(*args)
    except BaseException:
        # torch's error record has a timestamp in whole seconds; this one tells apart a rank that
        # raised from the peers that failed on its closed connection a few milliseconds later
        Path(failure_dir, os.environ["RANK"]).write_text(str(time.time_ns()))
        raise


def share_cores() -> None:
    """Give this worker its share of the machine's cores, so N local workers do not oversubscribe
    them N-fold (torch's threads, and dropkit's kernels, which follow torch's thread count)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def launch(nproc: int, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in ``nproc`` worker processes on this machine; return rank 0's result.

    ``fn`` must be importable (a module-level function). If any rank raises or dies, the others
    are stopped and :class:`WorkerFailed` names the rank and its error.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"dropkit-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
        monitor_interval=MONITOR_INTERVAL, start_method="spawn",
    )
    with tempfile.TemporaryDirectory(prefix="dropkit-failures-") as failure_dir:
        try:
            results = elastic_launch(config, _worker)(fn, args, failure_dir)
        except ChildFailedError as err:
            raise WorkerFailed(_describe_failure(err, _failure_times(failure_dir))) from None
    return results[0]


def _failure_times(failure_dir: str) -> dict[int, int]:
    """Rank -> nanosecond time at which it raised, for the ranks that raised (see :func:`_worker`)."""
    times = {int(path.name): path.read_text().strip() for path in Path(failure_dir).iterdir()}
    return {rank: int(text) for rank, text in times.items() if text.isdigit()}  # a rank may die mid-write


def _describe_failure(err: ChildFailedError, raised_at: dict[int, int]) -> str:
    """Name the rank that failed first (the cause) and its error; list the ranks stopped after it.

    Failures are ordered by torch's timestamp (whole seconds), then by ``raised_at``; a rank that
    died without raising (killed) has no such time and goes first within its second.
    """
    first_rank, first = min(err.failures.items(), key=lambda item: (item[1].timestamp, raised_at.get(item[0], -1)))
    others = sorted(r for r in err.failures if r != first_rank)
    text = (f"distributed run stopped: rank {first_rank} (pid {first.pid}) failed (exit code {first.exitcode}): "
            f"{_error_line(first)}")
    return text + (f"; then ranks {others} stopped" if others else "")


def _error_line(failure: Any) -> str:
    """The last line of the error a worker recorded (its exception), or its exit code."""
    message = failure.message.get("message", "") if isinstance(failure.message, dict) else str(failure.message)
    lines = message.strip().splitlines()
    return lines[-1] if lines else f"exit code {failure.exitcode}"
