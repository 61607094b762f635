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

import json
import os
import socket
import tempfile
import time
import traceback
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

from dropkit.lab.atomic_files import atomic_write_text

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

    On an exception the group is not torn down: a graceful teardown would wait on peers that may
    be gone, while exiting at once lets the launcher stop the job.
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
def _worker(fn: Callable[..., T], args: tuple[Any, ...], record_dir: str) -> T:
    share_cores()
    rank_name = os.environ["RANK"]
    atomic_write_text(Path(record_dir, f"started-{rank_name}"), json.dumps({"pid": os.getpid()}))
    try:
        with process_group():
            return fn(*args)
    except BaseException as exc:
        atomic_write_text(Path(record_dir, f"raised-{rank_name}"), json.dumps({
            "pid": os.getpid(), "time_ns": time.time_ns(), "error": _exception_line(exc),
            "peer_lost": _is_peer_loss(exc)}))
        raise


def _exception_line(exc: BaseException) -> str:
    """The exception as ``Type: message``, folded onto one line."""
    lines = traceback.format_exception_only(type(exc), exc)
    return " ".join(line.strip() for line in lines).strip()


def _is_peer_loss(exc: BaseException) -> bool:
    """True when ``exc`` is a collective failing because a peer went away (a consequence, not a cause).

    Gloo raises a plain ``RuntimeError`` whose text names its source file; other backends raise
    torch's ``DistError`` family.
    """
    return isinstance(exc, dist.DistError) or "gloo" in str(exc).lower()


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
    with tempfile.TemporaryDirectory(prefix="dropkit-ranks-") as record_dir:
        try:
            results = elastic_launch(config, _worker)(fn, args, record_dir)
        except ChildFailedError as err:
            raise WorkerFailed(_describe_failure(err.failures, *_read_records(record_dir))) from None
    return results[0]


def _read_records(record_dir: str) -> tuple[dict[int, int], dict[int, dict[str, Any]]]:
    """What the workers wrote (see :func:`_worker`): rank -> pid for the ranks that started, and
    rank -> ``{pid, time_ns, error, peer_lost}`` for the ranks that raised."""
    started: dict[int, int] = {}
    raised: dict[int, dict[str, Any]] = {}
    for path in Path(record_dir).glob("*-[0-9]*"):
        kind, _, rank_name = path.name.partition("-")
        if not rank_name.isdigit():
            continue  # the temporary file of a rank that died mid-write
        record = json.loads(path.read_text())
        if kind == "started":
            started[int(rank_name)] = record["pid"]
        else:
            raised[int(rank_name)] = record
    return started, raised


def _describe_failure(failures: dict[int, Any], started: dict[int, int],
                      raised: dict[int, dict[str, Any]]) -> str:
    """Name the rank whose failure stopped the run (the cause) and its error.

    ``failures`` is torch's record (``ChildFailedError.failures``): the launcher keeps only the
    first dead worker it happens to find, which is often a peer that failed on the cause's closed
    connection. So the cause is chosen from what the workers wrote, in this order:

    1. a rank torch saw die that never raised (killed by a signal, or ``os._exit``);
    2. else the rank that raised first with an error of its own (not a lost peer);
    3. else, when every rank that raised lost a peer, the ranks that started and never raised: they
       vanished first (killed before torch looked), named by the pids in their start records.

    A failure always leaves at least one record (torch's or a worker's), so one of these applies.
    """
    silent = {r: f for r, f in failures.items() if r not in raised}
    if silent:
        rank_, failure = min(silent.items(), key=lambda item: item[1].timestamp)
        cause = f"rank {rank_} (pid {failure.pid}) failed (exit code {failure.exitcode}) without raising"
        return _stopped(cause, [rank_], failures, raised)
    own = {r: record for r, record in raised.items() if not record["peer_lost"]}
    rank_, record = min((own or raised).items(), key=lambda item: item[1]["time_ns"])
    vanished = [] if own else sorted(r for r in started if r not in raised)
    if vanished:
        names = ", ".join(f"rank {r} (pid {started[r]})" for r in vanished)
        cause = f"{names} failed without raising (killed?); rank {rank_} then lost its peer: {record['error']}"
    else:
        cause = f"rank {rank_} (pid {record['pid']}) failed: {record['error']}"
    return _stopped(cause, [rank_, *vanished], failures, raised)


def _stopped(cause: str, cause_ranks: list[int], failures: dict[int, Any], raised: dict[int, dict[str, Any]]) -> str:
    """The message: the cause, then the other ranks known to have failed after it."""
    others = sorted((set(failures) | set(raised)) - set(cause_ranks))
    return f"distributed run stopped: {cause}" + (f"; then ranks {others} stopped" if others else "")
