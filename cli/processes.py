"""``serve --workers N``: N API processes on one port, each with a listening socket of its own.

uvicorn's own ``--workers`` shares one listening socket among its processes: the process whose
event loop wakes first accepts every connection waiting, so connections opened together land on
one process (49 of 50 in the benchmark, docs/PERFORMANCE.md) and the other cores sit idle for
as long as those connections live. Here every process binds its own socket to the same address
with ``SO_REUSEPORT`` and the kernel spreads new connections over them by a hash of the
client's address and port (on Linux; other systems may not balance).

The parent only supervises: it starts the processes, starts another in place of one that
exits (waiting longer each time one fails right after its start), and stops them all on
SIGINT, SIGTERM or SIGHUP (each finishes its requests in flight); if the parent is killed,
the kernel stops them (Linux). Unlike uvicorn's supervisor it does not ping the processes or
reload them on SIGHUP.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("dmae.api")

BACKLOG = 2048  # uvicorn's default
STOP_GRACE_S = 30.0  # per process, after SIGTERM, before SIGKILL
EARLY_EXIT_S = 60.0  # a process that exits sooner after its start failed to start
RETRY_MAX_S = 30.0  # the longest wait before starting again a slot whose processes fail early
PR_SET_PDEATHSIG = 1  # Linux prctl: a signal for the child when its parent dies


def _tcp_socket(host: str) -> socket.socket:
    """An unbound TCP socket of the host's address family, with SO_REUSEADDR."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on (host, port) that other processes can bind as well
    (SO_REUSEPORT). It listens at once, before the app has started: a connection waits in its
    backlog meanwhile, and another group's start-up check sees the port taken.

    Raises OSError when the address is taken by a socket without SO_REUSEPORT or of another
    user."""
    sock = _tcp_socket(host)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def bound_socket(host: str, port: int) -> socket.socket:
    """The one process's listening socket on (host, port), bound before anything says it is
    serving. ValueError ``cannot listen on HOST:PORT: REASON`` when it cannot be bound (e.g.
    the port is in use)."""
    sock = _tcp_socket(host)
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def _check_free(host: str, port: int) -> None:
    """ValueError where the system has no SO_REUSEPORT, or when something listens on
    (host, port) already: bound without SO_REUSEPORT, so another group of processes (an earlier
    ``serve --workers``) cannot silently share it."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("--workers above 1 needs SO_REUSEPORT (Linux); run one process")
    with _tcp_socket(host) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def _stop_with_parent(supervisor: int) -> None:
    """Have the kernel send SIGTERM to this process when its supervisor (pid ``supervisor``)
    dies, even by SIGKILL (Linux), so no API process is left serving on its own."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != supervisor:  # it died before the line above
        raise SystemExit(0)


def _serve_one(
    host: str, port: int, log_level: str, setup_logging: Callable[[str], None], supervisor: int
) -> None:
    """One API process (spawned): the app on a socket of its own."""
    import uvicorn

    _stop_with_parent(supervisor)
    setup_logging(log_level)
    sock = listening_socket(host, port)
    config = uvicorn.Config("cli.asgi:create_app", factory=True, log_level=log_level)
    uvicorn.Server(config).run(sockets=[sock])


def serve_processes(
    workers: int, host: str, port: int, log_level: str, setup_logging: Callable[[str], None]
) -> int:
    """Run ``workers`` API processes on (host, port) until SIGINT, SIGTERM or SIGHUP; 0 when
    stopped, 1 when every process failed to start (each one's log says why). Each process first
    calls ``setup_logging(log_level)`` (a module-level function: it is pickled by name).

    A process that exits is started again; one that exits within ``EARLY_EXIT_S`` of its start
    is started again after a wait that doubles each time (1 s up to ``RETRY_MAX_S``), so a
    failure that lasts (the database away, a broken release) is retried without a loop of
    tracebacks, while the other processes keep serving."""
    if port == 0:
        raise ValueError("--workers above 1 needs a fixed --port: every process binds the same")
    _check_free(host, port)
    spawn = multiprocessing.get_context("spawn")
    processes: dict[int, Any] = {}
    started: dict[int, float] = {}
    retry_at: dict[int, float] = {}
    waits: dict[int, float] = {}
    stop = threading.Event()

    def start(slot: int) -> None:
        proc = spawn.Process(
            target=_serve_one,
            args=(host, port, log_level, setup_logging, os.getpid()),
            name=f"dmae-api-{slot}",
        )
        proc.start()
        processes[slot], started[slot] = proc, time.monotonic()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in stops}
    failed = False
    try:
        for slot in range(workers):
            start(slot)
        while not stop.wait(0.5):
            now = time.monotonic()
            for slot, proc in list(processes.items()):
                if proc.is_alive() or slot in retry_at:
                    continue
                if now - started[slot] < EARLY_EXIT_S:
                    waits[slot] = min(2 * waits.get(slot, 0.5), RETRY_MAX_S)
                    retry_at[slot] = now + waits[slot]
                    log.error(
                        "API process %s exited %.0f s after its start (code %s); starting "
                        "another in %.0f s",
                        proc.pid, now - started[slot], proc.exitcode, waits[slot],
                    )  # fmt: skip
                else:
                    waits.pop(slot, None)
                    retry_at[slot] = now
                    log.warning("API process %s exited (code %s)", proc.pid, proc.exitcode)
            if retry_at and len(retry_at) == len(processes) and all(waits.get(s) for s in retry_at):
                log.error("no API process could start; stopping (see their errors above)")
                failed = True
                break
            for slot, when in list(retry_at.items()):
                if when <= now:
                    del retry_at[slot]
                    start(slot)
    finally:
        for proc in processes.values():
            if proc.is_alive():
                proc.terminate()  # SIGTERM: uvicorn finishes the requests in flight
        for proc in processes.values():
            proc.join(STOP_GRACE_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 1 if failed else 0
