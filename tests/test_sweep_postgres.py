"""dropkit sweep on a real PostgreSQL server (tests/pg_server.py): several ``dropkit sweep``
commands, each its own process as on its own machine, share one study through the server.

They finish exactly the requested trials, none twice, whether they share a run folder or each
has its own; a worker killed with SIGKILL mid-trial loses only that trial, which a live worker
runs again (on this machine as soon as the process is gone, from another machine once its
heartbeat is stale); a sweep with other settings is refused; and a server restarted mid-sweep
costs the workers a wait, not the sweep, while a server that stays down makes them fail in
bounded time with an error naming it.

Training is real, on a slice of MNIST with a 16-unit MLP; every test is marked slow. Each test
prints one JSON line (``postgres sweep:``) with its trial counts and timings.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

pytestmark = pytest.mark.slow

STUDY = "shared"
#: a small real training run: a few seconds per trial
SMALL = ["--model", "tutorial_mlp", "--model-arg", "hidden=16", "--limit-test", "200", "--val-size", "200",
         "--batch-size", "100", "--p-step", "0"]
#: seconds a worker command may take before the test calls it hung (generous: a loaded machine is slow)
HANG_LIMIT = 600
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


#: ``dropkit sweep`` whose worker stops itself (SIGSTOP) right after its first trial reports its
#: first epoch: the test then knows, without racing the worker, which trial it holds
FREEZING_SWEEP = (
    "import os, signal, sys\n"
    "from dropkit.lab.sweep.trial import EpochReport\n"
    "report = EpochReport.on_epoch_end\n"
    "def on_epoch_end(self, model, epoch, row):\n"
    "    report(self, model, epoch, row)\n"
    "    if not getattr(EpochReport, 'frozen', False):\n"
    "        EpochReport.frozen = True\n"
    "        os.kill(os.getpid(), signal.SIGSTOP)\n"
    "EpochReport.on_epoch_end = on_epoch_end\n"
    "from dropkit.lab.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _start(out: Path, url: str, log: Path, *args: str, prefix: tuple[str, ...] = (),
           entry: tuple[str, ...] = ("-m", "dropkit")) -> subprocess.Popen:
    """Start one ``dropkit sweep`` command on the shared study, its output to ``log``."""
    command = [*prefix, sys.executable, *entry, "sweep", "--storage", url, "--study", STUDY,
               "--out", str(out), *SMALL, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)


def _wait(procs: list[subprocess.Popen], logs: list[Path], limit: float = HANG_LIMIT) -> list[int]:
    """Every command's exit code; a command still running after ``limit`` seconds fails the test."""
    deadline = time.monotonic() + limit
    codes = []
    try:
        for proc in procs:
            codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a sweep worker hung for {limit} s; output:\n" + _outputs(logs))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return codes


def _outputs(logs: list[Path]) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in logs)


@functools.cache
def _storage(url: str) -> optuna.storages.RDBStorage:
    """One storage (one connection pool) per database for the test's own looks at the study."""
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials; none while no worker has created it yet."""
    storage = _storage(url)
    if STUDY not in [s.study_name for s in storage.get_all_studies()]:
        return []
    return optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)


def _wait_for(condition, what: str, limit: float = HANG_LIMIT, procs: list[subprocess.Popen] = ()):
    """Poll ``condition()`` until it returns something true; fail after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        assert all(p.poll() is None for p in procs), f"a worker ended while waiting for {what}"
        time.sleep(0.2)
    pytest.fail(f"no {what} within {limit} s")


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped by a signal (state T in /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def _report(**figures) -> None:
    print("postgres sweep: " + json.dumps(figures), flush=True)


def _check_whole_trials(trials: list[optuna.trial.FrozenTrial], n: int) -> list[optuna.trial.FrozenTrial]:
    """Exactly ``n`` finished trials, no two with the same rates or the same run folder; every
    failed one either surplus (created past the budget, never trained) or listed by the caller."""
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == n
    assert len({t.params["p"] for t in finished}) == n
    assert len({t.user_attrs["run_dir"] for t in finished}) == n
    assert all(Path(t.user_attrs["run_dir"]).is_dir() for t in finished)
    return finished


def _check_jobs(trials: list[optuna.trial.FrozenTrial], n: int) -> None:
    """--pruner promote: ``n`` configurations, each job (configuration, start epoch) finished once,
    every failed job a surplus or a duplicate that never trained."""
    finished = [t for t in trials if t.state in FINISHED]
    jobs = [(t.user_attrs["config"], t.user_attrs.get("resumes_from", 0)) for t in finished]
    assert len(jobs) == len(set(jobs))
    first = [t for t in finished if not t.user_attrs.get("resumes_from")]
    assert len(first) == n and len({t.params["p"] for t in first}) == n
    assert any(t.state == TrialState.COMPLETE for t in finished)
    for t in trials:
        if t.state == TrialState.FAIL:
            assert t.user_attrs.get("surplus") or t.user_attrs.get("duplicate"), t.user_attrs
            assert not t.intermediate_values


@pytest.mark.parametrize(("workers", "folders", "pruner"), [
    (2, "shared", "halving"),
    (3, "per-worker", "promote"),
])
def test_worker_commands_finish_exactly_the_requested_trials(tmp_path, postgres_url, workers, folders, pruner):
    """Started at the same moment on an empty database, so that they also race to create the
    schema and the study. A shared run folder puts them under one machine lock; per-worker
    folders are machines that share nothing but the server."""
    n = 6
    outs = [tmp_path / ("runs" if folders == "shared" else f"machine{i}") for i in range(workers)]
    logs = [tmp_path / f"worker{i}.log" for i in range(workers)]
    start = time.monotonic()
    procs = [_start(out, postgres_url, log, "--trials", str(n), "--epochs", "2", "--limit-train", "600",
                    "--pruner", pruner) for out, log in zip(outs, logs)]
    codes = _wait(procs, logs)
    assert codes == [0] * workers, _outputs(logs)
    trials = _trials(postgres_url)
    if pruner == "promote":
        _check_jobs(trials, n)
    else:
        _check_whole_trials(trials, n)
        assert not [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("surplus")]
    for log in logs:
        assert "best on validation" in log.read_text()
    _report(test=f"{workers} workers, {folders} folders, {pruner}", trials=len(trials),
            finished=sum(t.state in FINISHED for t in trials), seconds=round(time.monotonic() - start, 1))


def _can_be_another_host() -> bool:
    """Whether a command can run under another host name (a UTS namespace: root on Linux)."""
    try:
        return subprocess.run(["unshare", "--uts", "sh", "-c", "hostname other-machine"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.parametrize("where", ["same-machine", "other-machine"])
def test_a_killed_worker_loses_only_its_trial_which_a_live_worker_runs_again(tmp_path, postgres_url, where):
    """Worker A starts first and stops itself (SIGSTOP) once its first trial has reported an
    epoch, so the test knows the trial it holds whatever the machine's speed; worker B starts, and
    A is killed with SIGKILL. On the same machine, B sees A's process gone; A on another machine
    (another host name, in a UTS namespace) is found dead by Optuna's heartbeat, older than
    --stale-after. B fails A's trial, queues its rates again and trains them; the study ends with
    exactly the requested trials."""
    prefix: tuple[str, ...] = ()
    if where == "other-machine":
        if not _can_be_another_host():
            pytest.skip("cannot run a command under another host name here (unshare --uts needs root on Linux)")
        prefix = ("unshare", "--uts", "sh", "-c", 'hostname other-machine && exec "$@"', "sh")
    n, stale = 4, 4.0
    args = ("--trials", str(n), "--epochs", "3", "--limit-train", "3000", "--pruner", "halving",
            "--stale-after", str(stale))
    out, logs = tmp_path / "runs", [tmp_path / "a.log", tmp_path / "b.log"]
    a = _start(out, postgres_url, logs[0], *args, prefix=prefix, entry=("-c", FREEZING_SWEEP))
    _wait_for(lambda: _stopped(a.pid), "worker A to stop itself after its first epoch", procs=[a])
    victim = next(t for t in _trials(postgres_url) if t.state == TrialState.RUNNING
                  and t.user_attrs.get("owner", {}).get("pid") == a.pid)
    assert victim.intermediate_values
    b = _start(out, postgres_url, logs[1], *args)
    a.send_signal(signal.SIGKILL)
    killed_at = time.time()
    a.wait()
    assert _wait([b], logs) == [0], _outputs(logs)

    trials = _trials(postgres_url)
    _check_whole_trials(trials, n)
    failed = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("surplus")]
    assert [t.number for t in failed] == [victim.number]
    retry = [t for t in trials if victim.number in t.system_attrs.get("retry_history", [])]
    assert len(retry) == 1 and retry[0].state in FINISHED and retry[0].params == victim.params
    # which check fails the trial first (B's process check on this machine, or Optuna's heartbeat
    # once it is stale) depends on how long B takes to start; tests/test_sweep.py tests each alone
    expected_owner = "other-machine" if where == "other-machine" else os.uname().nodename
    assert victim.user_attrs["owner"]["host"] == expected_owner
    marked_dead = failed[0].datetime_complete.timestamp() - killed_at
    if where == "other-machine":
        assert marked_dead >= stale - 1.5  # not before its heartbeat (every stale / 4 s) went stale
    _report(test=f"SIGKILL, {where}", trials=len(trials), finished=sum(t.state in FINISHED for t in trials),
            failed=len(failed), epochs_lost=len(victim.intermediate_values),
            seconds_kill_to_marked_dead=round(marked_dead, 1),
            seconds_kill_to_retry_finished=round(retry[0].datetime_complete.timestamp() - killed_at, 1),
            seconds_kill_to_sweep_done=round(time.time() - killed_at, 1))


def test_a_sweep_with_other_settings_is_refused(tmp_path, postgres_url, capsys):
    """The study's settings live in the server: a command from another folder (another machine)
    with other epochs or another search range is refused and names what differs. The commands run
    in this process (no worker of theirs runs alongside another here)."""
    from dropkit.lab.cli import main

    def sweep(out: Path, *args: str) -> tuple[int, str]:
        code = main(["sweep", "--storage", postgres_url, "--study", STUDY, "--out", str(out), *SMALL, "--trials", "1",
                     "--limit-train", "300", "--pruner", "none", *args])
        return code, capsys.readouterr().err

    assert sweep(tmp_path / "a", "--epochs", "1")[0] == 0
    for args, differs in ((("--epochs", "2"), "epochs: 1 -> 2"),
                          (("--epochs", "1", "--p-range", "0.1", "0.5"), "search space")):
        code, err = sweep(tmp_path / "b", *args)
        assert code == 2, err
        assert f"study '{STUDY}' was made with other settings" in err and differs in err
    assert len(_trials(postgres_url)) == 1


def test_a_server_restarted_mid_sweep_costs_a_wait_not_the_sweep(tmp_path, postgres_server, postgres_url):
    """The server goes down (fast shutdown: every connection closed) while two workers are inside
    the sweep, and comes back 5 s later. The workers retry and finish exactly the requested trials."""
    n = 4
    out, logs = tmp_path / "runs", [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_start(out, postgres_url, log, "--trials", str(n), "--epochs", "3", "--limit-train", "3000",
                    "--pruner", "halving", entry=entry)
             for log, entry in zip(logs, [("-c", FREEZING_SWEEP), ("-m", "dropkit")])]
    # A stops itself inside a trial, so the sweep cannot end before the server goes down
    _wait_for(lambda: _stopped(procs[0].pid), "worker A to stop itself after its first epoch", procs=procs)
    start = time.monotonic()
    postgres_server.stop("fast")
    down_at = time.monotonic()
    procs[0].send_signal(signal.SIGCONT)
    time.sleep(5)
    postgres_server.start()
    up_at = time.monotonic()
    codes = _wait(procs, logs)
    assert codes == [0, 0], _outputs(logs)
    trials = _trials(postgres_url)
    _check_whole_trials(trials, n)
    output = _outputs(logs)
    assert "Traceback" not in output
    _report(test="server restarted mid-sweep", trials=len(trials), finished=sum(t.state in FINISHED for t in trials),
            failed=sum(t.state == TrialState.FAIL for t in trials), seconds_down=round(up_at - down_at, 1),
            seconds_restart_to_sweep_done=round(time.monotonic() - start, 1),
            waits_logged=len(re.findall("storage .* unreachable", output)))


def test_a_server_that_stays_down_fails_the_workers_in_bounded_time_naming_it(tmp_path, postgres_server,
                                                                            postgres_url):
    out, log = tmp_path / "runs", tmp_path / "a.log"
    proc = _start(out, postgres_url, log, "--trials", "4", "--epochs", "3", "--limit-train", "3000",
                  "--pruner", "halving", "--storage-timeout", "3", entry=("-c", FREEZING_SWEEP))
    _wait_for(lambda: _stopped(proc.pid), "the worker to stop itself after its first epoch", procs=[proc])
    postgres_server.stop("immediate")  # the server goes while the worker is inside a trial
    down_at = time.monotonic()
    proc.send_signal(signal.SIGCONT)
    try:
        assert _wait([proc], [log], limit=120) == [1]
        took = time.monotonic() - down_at
    finally:
        postgres_server.start()
    output = log.read_text()
    host = postgres_url.split("@")[1]
    assert re.search(rf"storage postgresql://\S*{re.escape(host)}\S* unreachable", output), output
    assert "Traceback" not in output
    _report(test="server down for good", seconds_down_to_exit=round(took, 1))


def _readme_recipe() -> list[str]:
    """The command lines of the README's "Sweeps across machines" section, comments removed."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Sweeps across machines", 1)[1].split("\n#", 1)[0]
    return [line.split("  #")[0].strip() for line in section.splitlines() if line.startswith("    ")]


def _private_machine(folder: Path, host: str) -> tuple[str, ...] | None:
    """A command prefix that runs under host name ``host`` with its own empty filesystem mounted at
    ``folder`` (mount and UTS namespaces), as on a machine of its own; None where not allowed."""
    prefix = ("unshare", "--mount", "--uts", "sh", "-c",
              'mount -t tmpfs tmpfs "$0" && cd "$0" && hostname "$1" && shift && exec "$@"', str(folder), host)
    folder.mkdir(exist_ok=True)
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return prefix if ok else None


def test_the_readme_recipe_runs_as_written_on_two_machines(tmp_path, postgres_server):
    """The README's commands, run as written with the server's host, port and user put in for
    DBHOST, 5432 and USER, and a small run's flags appended (argparse keeps the last): the database
    is created, then the sweep command runs on two "machines" (own host name, own empty filesystem
    at the same path, so that neither sees the other's runs) with 2 workers each."""
    pip, createdb, sweep = _readme_recipe()
    assert pip.startswith("pip install 'dropkit[postgres]'")
    values = {"DBHOST": "127.0.0.1", "5432": str(postgres_server.port), "USER": "dropkit"}
    fill = lambda line: re.sub("|".join(values), lambda m: values[m.group(0)], line)  # noqa: E731
    words = fill(createdb).split()
    assert words[0] == "createdb"
    done = postgres_server._run(*words, timeout=60)
    assert done.returncode == 0, done.stderr
    words = fill(sweep).split()
    assert words[:2] == ["dropkit", "sweep"]
    url = words[words.index("--storage") + 1]
    study = words[words.index("--study") + 1]
    command = [sys.executable, "-m", "dropkit", *words[1:], *SMALL, "--trials", "4", "--epochs", "2",
               "--limit-train", "600"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    logs, procs = [tmp_path / "machine0.log", tmp_path / "machine1.log"], []
    private = _private_machine(tmp_path / "machine", "machine0")
    for i, log in enumerate(logs):
        if private is not None:
            prefix, cwd = (*private[:-1], f"machine{i}"), None
        else:  # no namespaces here: two folders of one filesystem
            prefix, cwd = (), tmp_path / f"machine{i}"
            cwd.mkdir(exist_ok=True)
        with open(log, "w") as handle:
            procs.append(subprocess.Popen([*prefix, *command], stdout=handle, stderr=subprocess.STDOUT, env=env,
                                          cwd=cwd))
    assert _wait(procs, logs) == [0, 0], _outputs(logs)
    trials = optuna.load_study(study_name=study, storage=url).get_trials()
    _check_jobs(trials, 4)
    winners = [re.search(r"best on validation: trial \d+ .*", log.read_text()) for log in logs]
    assert all(winners) and winners[0].group(0) == winners[1].group(0), _outputs(logs)
    if private is not None:  # the winner's run is on one machine only: the other trains it again
        assert sum("training it again there for its test accuracy" in log.read_text() for log in logs) >= 1
    # which machine trains how many trials depends on their speed: a fast one may take them all
    _report(test="README recipe, 2 machines x 2 workers", private_filesystems=private is not None,
            trials=len(trials), finished=sum(t.state in FINISHED for t in trials))
