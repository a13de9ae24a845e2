"""``serve --workers N``: N API processes on one port, each with a listening socket of its own.

uvicorn's own ``--workers`` shares one listening socket among its processes: the process whose
event loop wakes first accepts every connection waiting, so connections opened together land on
one process (49 of 50 in the benchmark, docs/PERFORMANCE.md) and the other cores sit idle for
as long as those connections live. Here every process binds its own socket to the same address
with ``SO_REUSEPORT`` and the kernel spreads new connections over them by a hash of the
client's address and port (on Linux; other systems may not balance).

The parent only supervises: it starts the processes, starts another in place of one that
exits, and stops them all on SIGINT or SIGTERM (each finishes its requests in flight).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("dmae.api")

STARTUP_FAILURE = 3  # uvicorn's exit code when the app cannot start (then none is restarted)
STOP_GRACE_S = 30.0  # per process, after SIGTERM, before SIGKILL


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) that other processes can bind as well (SO_REUSEPORT).

    Raises OSError when the address is taken by a socket without SO_REUSEPORT or of another
    user, and ValueError where the system has no SO_REUSEPORT."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("--workers above 1 needs SO_REUSEPORT (Linux); run one process")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _check_free(host: str, port: int) -> None:
    """ValueError when something listens on (host, port) already: bound without SO_REUSEPORT,
    so another group of processes (an earlier ``serve --workers``) cannot silently share it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def _serve_one(host: str, port: int, log_level: str, setup_logging: Callable[[str], None]) -> None:
    """One API process (spawned): the app on a socket of its own."""
    import uvicorn

    setup_logging(log_level)
    sock = listening_socket(host, port)
    config = uvicorn.Config("app.main:create_app", factory=True, log_level=log_level)
    uvicorn.Server(config).run(sockets=[sock])


def serve_processes(
    workers: int, host: str, port: int, log_level: str, setup_logging: Callable[[str], None]
) -> int:
    """Run ``workers`` API processes on (host, port) until SIGINT or SIGTERM; 0 when stopped,
    1 when a process could not start the app (its log says why). Each process first calls
    ``setup_logging(log_level)`` (a module-level function: it is pickled by name)."""
    if port == 0:
        raise ValueError("--workers above 1 needs a fixed --port: every process binds the same")
    _check_free(host, port)
    spawn = multiprocessing.get_context("spawn")
    processes: dict[int, Any] = {}
    stop = threading.Event()

    def start(slot: int) -> None:
        proc = spawn.Process(
            target=_serve_one,
            args=(host, port, log_level, setup_logging),
            name=f"dmae-api-{slot}",
        )
        proc.start()
        processes[slot] = proc

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    failed = False
    try:
        for slot in range(workers):
            start(slot)
        while not stop.wait(0.5):
            for slot, proc in list(processes.items()):
                if proc.is_alive():
                    continue
                if proc.exitcode == STARTUP_FAILURE:
                    log.error("API process %s could not start the app; stopping", proc.pid)
                    failed = True
                    stop.set()
                    break
                log.warning(
                    "API process %s exited (code %s); starting another", proc.pid, proc.exitcode
                )
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
