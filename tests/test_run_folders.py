"""Run folders: one run at a time holds a folder (a second is refused naming the holder's pid, a
dead holder's lock is taken over), every writer has its own temporary file, and an output folder
that cannot be written (a file, /dev/null, read-only) is refused in one line before any work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dropkit.lab import run_lock
from dropkit.lab.atomic_files import atomic_write, temporary_name
from dropkit.lab.cli import main
from dropkit.lab.run_lock import LOCK_FILE, RunFolderBusy
from dropkit.lab.train import TrainConfig, iter_metrics, train

CLI_SMALL = ["--epochs", "1", "--limit-train", "300", "--limit-test", "100", "--val-size", "100", "--quiet"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture
def holder(tmp_path):
    """Start another process that takes the lock on a folder and waits; yields (folder, process)."""
    folder = tmp_path / "held"
    script = ("import sys, time; from dropkit.lab import run_lock\n"
              "with run_lock.hold(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)\n")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout.readline().strip() == "locked"
        yield folder, process
    finally:
        process.kill()
        process.wait()


def test_a_second_holder_in_this_process_is_refused_and_the_lock_is_released_after(tmp_path):
    with run_lock.hold(tmp_path / "run"):
        assert run_lock.holder(tmp_path / "run").startswith(f"pid {os.getpid()} on ")
        with pytest.raises(RunFolderBusy, match=f"{tmp_path / 'run'} is in use by another run \\(pid {os.getpid()} "):
            with run_lock.hold(tmp_path / "run"):
                pass
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    with pytest.raises(KeyError), run_lock.hold(tmp_path / "run"):
        raise KeyError  # an error inside the block releases the lock too
    with run_lock.hold(tmp_path / "run"):
        pass


def test_another_process_holding_the_folder_is_named_by_its_pid(holder):
    folder, process = holder
    with pytest.raises(RunFolderBusy, match=f"pid {process.pid} on "), run_lock.hold(folder):
        pass


def test_a_run_into_a_folder_another_process_holds_is_refused(holder, capsys):
    """The silently-wrong case: two runs into one folder used to interleave their metrics."""
    folder, process = holder
    with pytest.raises(RunFolderBusy, match=f"pid {process.pid}"):
        train(TrainConfig(limit_train=300, limit_test=100, val_size=100, epochs=1), folder, quiet=True)
    assert main(["train", *CLI_SMALL, "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"dropkit train: error: {folder} is in use by another run "
                                                   f"(pid {process.pid} on ")
    assert not (folder / "p=0.5").exists()  # refused before any work


def test_the_lock_of_a_killed_holder_is_taken_over(holder):
    folder, process = holder
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert run_lock.holder(folder).startswith(f"pid {process.pid} ")  # its file is still there, stale
    with run_lock.hold(folder):
        assert run_lock.holder(folder).startswith(f"pid {os.getpid()} ")


def test_a_stale_lock_file_without_a_live_holder_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text("pid 999999999 on elsewhere\n")
    with run_lock.hold(tmp_path):
        assert run_lock.holder(tmp_path).startswith(f"pid {os.getpid()} ")


def test_a_command_into_a_folder_run_twice_in_turn_is_fine(tmp_path):
    assert main(["train", *CLI_SMALL, "--out", str(tmp_path)]) == 0
    assert main(["train", *CLI_SMALL, "--out", str(tmp_path), "--epochs", "2", "--resume"]) == 0
    assert [row["epoch"] for row in iter_metrics(tmp_path / "p=0.5")] == [1, 2]
    assert not list(tmp_path.rglob(LOCK_FILE)) and not list(tmp_path.rglob("*.tmp"))


# --- temporary files --------------------------------------------------------------------------

def test_every_write_has_its_own_temporary_file(tmp_path):
    names = {temporary_name(tmp_path / "checkpoint.pt") for _ in range(100)}
    assert len(names) == 100
    assert all(n.name.startswith(f".checkpoint.pt.{os.getpid()}.") and n.name.endswith(".tmp") for n in names)


def test_two_writers_of_one_file_never_write_into_each_others_temporary(tmp_path):
    """Writer A starts, writer B writes and renames while A is half-way, then A finishes: the file
    is A's whole content and no temporary file is left (a shared name let B's rename take A's
    half-written file, or B's write truncate A's)."""
    target = tmp_path / "checkpoint.pt"
    a_started, b_done = threading.Event(), threading.Event()

    def slow(tmp):
        with open(tmp, "w") as handle:
            handle.write("A" * 1000)
            handle.flush()
            a_started.set()
            assert b_done.wait(10)
            handle.write("A" * 1000)

    writer_a = threading.Thread(target=atomic_write, args=(target, slow))
    writer_a.start()
    assert a_started.wait(10)
    atomic_write(target, lambda tmp: tmp.write_text("B" * 10))
    assert target.read_text() == "B" * 10
    b_done.set()
    writer_a.join()
    assert target.read_text() == "A" * 2000
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    def fails(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(tmp_path / "metrics.jsonl", fails)
    assert list(tmp_path.iterdir()) == []


# --- output folders that cannot be written ------------------------------------------------------

def _read_only_folder(tmp_path):
    """A folder this process cannot write into: a chmod-ed one, or under /sys for root (which
    ignores permission bits)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    if not os.access(folder, os.W_OK):
        return folder / "run", str(folder)
    if Path("/sys/kernel").is_dir():
        return Path("/sys/kernel/dropkit-run"), "/sys/kernel/dropkit-run"
    pytest.skip("no folder here is read-only for this user")


@pytest.mark.parametrize("case", ["a file", "under a file", "/dev/null", "read-only"])
@pytest.mark.parametrize("command", ["train", "compare", "sweep"])
def test_an_output_folder_that_cannot_be_written_is_refused_in_one_line(tmp_path, capsys, case, command):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    out, named = {"a file": (a_file, str(a_file)), "under a file": (a_file / "run", str(a_file)),
                  "/dev/null": (Path("/dev/null"), "/dev/null")}.get(case) or _read_only_folder(tmp_path)
    extra = {"train": [], "compare": ["--p", "0", "0.5"], "sweep": ["--trials", "1"]}[command]
    argv = [command, *extra, *(a for a in CLI_SMALL if command == "train" or a != "--quiet"), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"dropkit {command}: error: {named}: ")
    assert "Traceback" not in err
