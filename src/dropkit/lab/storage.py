"""A sweep's study on a database server that several machines share, reached with bounded waits.

A database shared by workers on several machines (``--storage postgresql://...``, see Optuna's
``RDBStorage``) brings failure modes that the sweep's default journal file does not have, and
:func:`open_database` meets each of them:

* The first workers to start race to create the schema: two ``CREATE TABLE`` statements for the
  same table collide in PostgreSQL's catalogue (a unique violation on ``pg_type``). Creating the
  storage is retried a few times; the retry finds the tables made and uses them.
* A server restart or a lost network drops every connection. Each storage call is retried while
  the storage is unreachable, with waits growing from 0.5 s to 5 s, for at most ``timeout``
  seconds; then :class:`StorageUnreachable` names the storage (password hidden) and the error.
  Connections are checked before use (SQLAlchemy's ``pool_pre_ping``), so those left from
  before a restart are replaced instead of failing the call.
* A server that stops answering must not hang a worker: with a libpq driver (psycopg,
  psycopg2) connecting gives up after :data:`CONNECT_TIMEOUT` seconds, and TCP keepalives find a
  dead peer in about :data:`KEEPALIVE_IDLE` + 3 x :data:`KEEPALIVE_INTERVAL` seconds.

A call is retried as a whole. A write whose commit reached the server but whose reply was lost
is therefore made twice; the only one that matters to a sweep is a trial created twice: the
extra one is RUNNING with no owner, and the sweep's dead-worker rule fails it and queues it
again once it is ``--stale-after`` seconds old, so the budget still ends exact.
"""

from __future__ import annotations

import abc
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy
import sqlalchemy.exc
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat

__all__ = ["CONNECT_TIMEOUT", "DEFAULT_TIMEOUT", "PatientStorage", "StorageUnreachable", "call_patiently", "describe",
           "lost_connection", "open_database"]

#: seconds a worker keeps retrying an unreachable storage by default (``--storage-timeout``)
DEFAULT_TIMEOUT = 60.0
#: seconds a libpq driver waits for a connection to open
CONNECT_TIMEOUT = 10
#: TCP keepalive of libpq connections: probes after this many idle seconds ...
KEEPALIVE_IDLE = 10
#: ... every this many seconds, and the connection is dead after 3 unanswered ones
KEEPALIVE_INTERVAL = 5
#: attempts at creating a database storage whose schema other workers are creating too
SCHEMA_ATTEMPTS = 5
#: the drivers that take libpq's connection parameters
_LIBPQ_DRIVERS = ("psycopg", "psycopg2")

Log = Callable[[str], None]


class StorageUnreachable(ConnectionError):
    """The study's storage stayed unreachable for the whole ``--storage-timeout``."""


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def describe(url: str) -> str:
    """The storage URL with its password hidden, for messages."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def lost_connection(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) means that the storage cannot be reached:
    a connection refused, dropped or timed out, as opposed to a query the server rejected."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, sqlalchemy.exc.DBAPIError) and err.connection_invalidated:
            return True
        if isinstance(err, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
            return True
        err = err.__cause__ or err.__context__
    return False


def _engine_kwargs(url: str, timeout: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "pool_timeout": max(1.0, timeout)}
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in _LIBPQ_DRIVERS:
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT, "keepalives": 1,
                                  "keepalives_idle": KEEPALIVE_IDLE, "keepalives_interval": KEEPALIVE_INTERVAL,
                                  "keepalives_count": 3}
    return kwargs


class PatientStorage(BaseStorage, BaseHeartbeat):
    """An Optuna storage that retries every call of ``inner`` while the storage is unreachable
    (see :func:`lost_connection`), for at most ``timeout`` seconds from the first failure of a
    call, then raises :class:`StorageUnreachable` naming ``name``. The first failure of an outage
    and the recovery are logged. Other errors pass through at once. Optuna's heartbeat calls are
    forwarded too, so a heartbeat that ``inner`` keeps works through the wrapper.

    Args:
        inner: the storage that does the work (an ``RDBStorage``).
        name: how messages name the storage (a URL without its password).
        timeout: seconds to keep retrying one call.
        log: where the outage lines go (default: stderr).
    """

    def __init__(self, inner: BaseStorage, name: str, timeout: float = DEFAULT_TIMEOUT, log: Log = _say) -> None:
        self.inner, self.name, self.timeout, self.log = inner, name, timeout, log

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return call_patiently(lambda: getattr(self.inner, method)(*args, **kwargs), self.name, self.timeout, self.log)

    def get_heartbeat_interval(self) -> int | None:
        """The wrapped storage's heartbeat interval; None when it keeps no heartbeat."""
        return self.inner.get_heartbeat_interval() if isinstance(self.inner, BaseHeartbeat) else None


def call_patiently(fn: Callable[[], Any], name: str, timeout: float, log: Log = _say) -> Any:
    """``fn()``, called again while it fails for want of the storage ``name`` (see
    :func:`lost_connection`), waiting 0.5 s, then twice as long each time up to 5 s, for at most
    ``timeout`` seconds from the first failure; then :class:`StorageUnreachable`. The first
    failure and the recovery are logged; any other error passes through at once."""
    deadline, wait = None, 0.5
    while True:
        try:
            result = fn()
        except Exception as err:
            if not lost_connection(err):
                raise
            now, reason = time.monotonic(), _first_line(err)
            if deadline is None:
                deadline = now + timeout
                log(f"storage {name} unreachable ({reason}); retrying for up to {timeout:g} s")
            if now >= deadline:
                raise StorageUnreachable(f"storage {name} unreachable for {timeout:g} s (--storage-timeout): "
                                         f"{reason}") from None
            time.sleep(min(wait * random.uniform(0.8, 1.0), deadline - now))
            wait = min(2 * wait, 5.0)
            continue
        if deadline is not None:
            log(f"storage {name} reachable again")
        return result


def _first_line(err: BaseException) -> str:
    """The driver's own message when there is one (SQLAlchemy adds the SQL and a link after it)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, sqlalchemy.exc.DBAPIError) and err.orig is not None:
            err = err.orig
            break
        err = err.__cause__ or err.__context__
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _forward(name: str) -> Callable[..., Any]:
    def method(self: PatientStorage, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, *args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"The wrapped storage's ``{name}``, retried while the storage is unreachable."
    return method


_FORWARDED = {n for n in dir(BaseStorage) if not n.startswith("_") and callable(getattr(BaseStorage, n))}
_FORWARDED |= set(BaseHeartbeat.__abstractmethods__) | {"get_failed_trial_callback"}
for _name in sorted(_FORWARDED - set(vars(PatientStorage))):
    setattr(PatientStorage, _name, _forward(_name))
abc.update_abstractmethods(PatientStorage)


def open_database(url: str, timeout: float = DEFAULT_TIMEOUT, log: Log = _say, **rdb_kwargs: Any) -> PatientStorage:
    """Optuna's ``RDBStorage`` on ``url`` (an SQLAlchemy URL, e.g. ``postgresql://user@host:5432/db``;
    ``rdb_kwargs`` go to it, e.g. its heartbeat), made again while other workers are creating the
    same schema (their ``CREATE TABLE`` collides with this one's) and while the server is
    unreachable, and wrapped in a :class:`PatientStorage` that waits up to ``timeout`` seconds for
    it whenever it is unreachable. A malformed URL or a missing driver raises ValueError naming
    ``--storage``.

    Example::

        storage = open_database("postgresql://sweeper@db-host/sweeps", timeout=60)
        study = optuna.create_study(study_name="mlp", storage=storage, load_if_exists=True)
    """
    name = describe(url)

    def make() -> RDBStorage:
        return call_patiently(lambda: RDBStorage(url, engine_kwargs=_engine_kwargs(url, timeout), **rdb_kwargs),
                              name, timeout, log)

    try:
        for _ in range(SCHEMA_ATTEMPTS - 1):
            try:
                return PatientStorage(make(), name, timeout, log)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                time.sleep(random.uniform(0.2, 1.0))
        return PatientStorage(make(), name, timeout, log)
    except sqlalchemy.exc.ArgumentError as err:
        raise ValueError(f"--storage {name!r} is not a database URL such as postgresql://user@host:5432/db: "
                         f"{err}") from None
    except ImportError as err:
        cause = err.__cause__ or err
        raise ValueError(f"--storage {name}: its database driver is not installed ({cause}); for "
                         "postgresql:// URLs: pip install 'dropkit[postgres]'") from None
