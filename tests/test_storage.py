"""dropkit.lab.storage without a server: which errors count as an unreachable storage, bounded
retries that end in an error naming the storage (password hidden), and a wrapper that forwards
every storage call (the real-server behaviour is in test_sweep_postgres.py)."""

from __future__ import annotations

import importlib.util
import re
import warnings

import optuna
import pytest
import sqlalchemy.exc
from optuna.storages import BaseStorage, InMemoryStorage, RDBStorage
from optuna.storages._heartbeat import is_heartbeat_enabled

from dropkit.lab.storage import (
    PatientStorage,
    StorageUnreachable,
    call_patiently,
    describe,
    lost_connection,
    open_database,
)


def _operational(message: str = "connection refused") -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError(message))


def _wrapped_by_optuna(err: Exception) -> optuna.exceptions.StorageInternalError:
    """An error as Optuna's RDBStorage raises it: StorageInternalError from the SQLAlchemy one."""
    try:
        raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from err
    except optuna.exceptions.StorageInternalError as wrapped:
        return wrapped


def test_a_lost_connection_is_recognised_through_optunas_wrapping_and_a_rejected_query_is_not():
    assert lost_connection(_operational())
    assert lost_connection(_wrapped_by_optuna(_operational()))
    assert not lost_connection(sqlalchemy.exc.IntegrityError("INSERT", {}, ValueError("duplicate key")))
    assert not lost_connection(_wrapped_by_optuna(sqlalchemy.exc.DataError("INSERT", {}, ValueError("too long"))))
    assert not lost_connection(KeyError("Record does not exist."))


def test_calls_are_retried_until_the_storage_answers():
    failures, lines = [_operational(), _wrapped_by_optuna(_operational())], []

    def flaky():
        if failures:
            raise failures.pop(0)
        return "answer"

    assert call_patiently(flaky, "postgresql://u@db/x", timeout=30, log=lines.append) == "answer"
    assert lines[0].startswith("storage postgresql://u@db/x unreachable (ConnectionRefusedError: connection refused)")
    assert lines[-1] == "storage postgresql://u@db/x reachable again" and len(lines) == 2


def test_a_storage_that_stays_unreachable_fails_after_the_timeout_naming_it():
    calls = []

    def down():
        calls.append(1)
        raise _operational("port 5432 failed: Connection refused")

    with pytest.raises(StorageUnreachable, match=r"storage postgresql://u@db/x unreachable for 1 s "
                                                 r"\(--storage-timeout\): .*port 5432 failed"):
        call_patiently(down, "postgresql://u@db/x", timeout=1, log=lambda line: None)
    assert len(calls) >= 2  # tried again before giving up


def test_other_errors_pass_through_at_once():
    calls = []

    def rejected():
        calls.append(1)
        raise sqlalchemy.exc.IntegrityError("INSERT", {}, ValueError("duplicate key"))

    with pytest.raises(sqlalchemy.exc.IntegrityError):
        call_patiently(rejected, "x", timeout=30, log=lambda line: None)
    assert calls == [1]


def test_the_password_is_hidden_in_messages():
    assert describe("postgresql://sweeper:s3cret@db-host:5432/sweeps") == "postgresql://sweeper:***@db-host:5432/sweeps"


def test_the_wrapper_forwards_every_storage_call_so_a_study_runs_on_it():
    assert not PatientStorage.__abstractmethods__
    assert all(hasattr(PatientStorage, name) for name in BaseStorage.__abstractmethods__)
    storage = PatientStorage(InMemoryStorage(), "memory", timeout=1)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 3


def test_the_wrapper_keeps_the_heartbeat_of_the_storage_it_wraps():
    """Optuna fails stale trials only through a storage that is a BaseHeartbeat with an interval."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        inner = RDBStorage("sqlite:///:memory:", heartbeat_interval=1, grace_period=2)
    storage = PatientStorage(inner, "sqlite", timeout=1)
    assert is_heartbeat_enabled(storage) and storage.get_heartbeat_interval() == 1
    study = optuna.create_study(storage=storage, study_name="s")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        trial = study.ask()
    storage.record_heartbeat(trial._trial_id)
    assert storage._get_stale_trial_ids(study._study_id) == []


@pytest.mark.parametrize(("url", "says"), [
    ("nonsense", "--storage 'nonsense' is not a database URL such as postgresql://"),
    ("postgresql+nodriver://u:pw@127.0.0.1:1/x", "--storage 'postgresql+nodriver://u:***@127.0.0.1:1/x' is not a"),
])
def test_a_bad_url_is_an_error_naming_the_flag(url, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        open_database(url, timeout=1, log=lambda line: None)


def test_a_missing_driver_is_an_error_naming_the_flag_and_the_extra():
    if importlib.util.find_spec("MySQLdb") is not None:
        pytest.skip("MySQLdb is installed here: its URL would not lack a driver")
    with pytest.raises(ValueError, match=re.escape("--storage mysql+mysqldb://u:***@127.0.0.1:1/x: its database "
                                                   "driver is not installed (No module named 'MySQLdb')")):
        open_database("mysql+mysqldb://u:pw@127.0.0.1:1/x", timeout=1, log=lambda line: None)
