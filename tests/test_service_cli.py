"""The README's path for real: `dmae-certify keys create`, `dmae-certify serve` (uvicorn, embedded
runner, SQLite under the data folder), then upload an image over HTTP and poll the job."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from service_support import (  # noqa: F401 - tiny_checkpoint and pg_url are fixtures
    SIGMA,
    assert_same_certificate,
    digit_png,
    pg_url,
    redis_keys_cleaned,
    reference,
    serve_process,
    tiny_checkpoint,
    wait_for,
)

CLI = str(Path(sys.executable).parent / "dmae-certify")


def test_keys_serve_upload_poll(tmp_path: Path, tiny_checkpoint: Path) -> None:  # noqa: F811
    env = {
        **os.environ,
        "DMAE_DATA_DIR": str(tmp_path / "data"),
        "DMAE_REGISTER_BUNDLED": "false",
        "DMAE_DEVICE": "cpu",
        "DMAE_BATCH_SIZE": "64",
    }
    for k in ("DMAE_DATABASE_URL", "DMAE_BROKER_URL"):
        env.pop(k, None)

    def cli(*args: str) -> str:
        out = subprocess.run([CLI, *args], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    admin = cli("keys", "create", "--admin", "--name", "ops")
    user = cli("keys", "create", "--name", "alice")
    assert admin.startswith("dmae_") and user.startswith("dmae_") and admin != user
    listing = cli("keys", "list")
    assert "ops" in listing and "alice" in listing and admin not in listing

    with (
        serve_process(tmp_path, env) as (base, _),
        httpx.Client(base_url=base, timeout=120) as http,
    ):
        r = http.post(
            "/admin/models",
            headers={"X-API-Key": admin},
            data={"path": "tiny.safetensors", "default": "true"},
        )
        assert r.status_code == 201, r.text
        png = digit_png(7)
        r = http.post(
            "/certify",
            headers={"X-API-Key": user},
            files={"image": ("7.png", png)},
            data={"sigma": str(SIGMA), "n0": "20", "n": "300", "seed": "42"},
        )
        assert r.status_code == 202, r.text
        job = wait_for(http.get, r.json()["url"], user)
        assert job["status"] == "succeeded", job
        want = reference(
            tiny_checkpoint, png, sigma=SIGMA, alpha=0.001, n0=20, n=300, seed=42, batch_size=64
        )
        assert_same_certificate(job["certificate"], want)
        schema = http.get("/openapi.json").json()
        assert {
            "/certify",
            "/jobs/{job_id}",
            "/jobs",
            "/models",
            "/admin/models",
            "/admin/training",
        } <= set(schema["paths"])
    assert "No API key existed" not in (tmp_path / "serve.log").read_text()
    assert (tmp_path / "data" / "dmae.sqlite3").is_file()


def test_serve_workers_needs_a_broker(tmp_path: Path) -> None:
    """The embedded runner lives in the one API process: --workers 2 without a broker is
    refused with the reason, before anything starts."""
    env = {**os.environ, "DMAE_DATA_DIR": str(tmp_path / "data"), "DMAE_BROKER_URL": ""}
    env.pop("DMAE_DATABASE_URL", None)
    out = subprocess.run([CLI, "serve", "--workers", "2"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "--workers needs DMAE_BROKER_URL" in out.stderr
    assert "Traceback" not in out.stderr


def _workers_env(tmp_path: Path, pg_url: str) -> tuple[dict[str, str], str]:
    """The environment of ``serve --workers`` on a fresh Postgres and Redis, and a client key."""
    import uuid

    from service_support import REDIS_URL, reset_postgres

    from domain.keys import create_key
    from domain.store import migrate
    from domain.store.db import get_database

    reset_postgres(pg_url)
    migrate.upgrade(pg_url)
    with get_database(pg_url).session() as s:
        key = create_key(s, "w")[1]
    env = {
        **os.environ,
        "DMAE_DATA_DIR": str(tmp_path / "data"),
        "DMAE_DATABASE_URL": pg_url,
        "DMAE_BROKER_URL": REDIS_URL,
        "DMAE_QUEUE": f"dmae-test-{uuid.uuid4().hex[:10]}",
        "DMAE_DEVICE": "cpu",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env, key


def _tcp_sockets(port: int) -> dict[int, str]:
    """Local TCP sockets on ``port``: {inode: state} (0A listening, 01 established)."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                found[int(fields[9])] = fields[3]
    return found


def _owners(inodes: set[int]) -> dict[int, set[int]]:
    """{pid: the inodes among ``inodes`` that the process holds}."""
    held: dict[int, set[int]] = {}
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            held.setdefault(int(fd.parent.parent.name), set()).add(int(target[8:-1]))
    return held


def _accepted(port: int, count: int) -> dict[int, int]:
    """{pid: connections it accepted on ``port``} once ``count`` are accepted (a connection in
    the kernel's queue has no inode until a process accepts it)."""
    deadline = time.monotonic() + 300
    while True:
        open_ = {i for i, state in _tcp_sockets(port).items() if state == "01" and i}
        per = {pid: len(inodes) for pid, inodes in _owners(open_).items()}
        if sum(per.values()) >= count or time.monotonic() > deadline:
            return per
        time.sleep(0.2)


def _listeners(port: int, count: int) -> dict[int, set[int]]:
    """The processes listening on ``port`` once there are ``count`` of them (a process listens
    after its app has started)."""
    deadline = time.monotonic() + 120
    while True:
        listening = {i for i, state in _tcp_sockets(port).items() if state == "0A"}
        owners = _owners(listening)
        if len(owners) == count or time.monotonic() > deadline:
            return owners
        time.sleep(0.2)


def test_serve_workers_each_listen_and_spread_connections(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
    redis_keys_cleaned: None,  # noqa: F811 - the queue and kombu keys are deleted afterwards
) -> None:
    """serve --workers 2: each process listens on a socket of its own (SO_REUSEPORT), so
    connections opened together are spread over both. With the one socket uvicorn's --workers
    shares, the process that woke first took 49 of 50 in the benchmark. A process that dies is
    replaced."""
    env, _ = _workers_env(tmp_path, pg_url)
    with serve_process(tmp_path, env, "--workers", "2", "--log-level", "warning") as (base, _):
        port = int(base.rsplit(":", 1)[1])
        listeners = _listeners(port, 2)
        assert len(listeners) == 2, listeners
        assert all(len(inodes) == 1 for inodes in listeners.values())
        assert len(set.union(*listeners.values())) == 2  # two sockets, not one shared
        # Who took each connection is read while every one of them waits for the end of its
        # request: no answer has been sent, so no keep-alive timer (5 s) can close one before
        # it is counted, however slowly this busy host reads /proc.
        clients = [socket.create_connection(("127.0.0.1", port), timeout=600) for _ in range(40)]
        try:
            for c in clients:
                c.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
            per = _accepted(port, 40)
            assert set(per) == set(listeners) and sum(per.values()) == 40, per
            assert min(per.values()) >= 8, per  # 40 by a fair coin: fewer than 8, p < 1e-5
            for c in clients:
                c.sendall(b"\r\n")
            for c in clients:
                assert c.recv(4096).startswith(b"HTTP/1.1 200"), "not answered"
        finally:
            for c in clients:
                c.close()
        killed = next(iter(listeners))
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while killed in (again := _listeners(port, 2)) or len(again) != 2:
            assert time.monotonic() < deadline, f"no replacement: {again}"
            time.sleep(0.2)
        assert httpx.get(f"{base}/healthz", timeout=120).status_code == 200


def test_serve_workers_refuse_a_port_in_use(tmp_path: Path) -> None:
    """Every process binds the port with SO_REUSEPORT, which another program's socket without
    it would refuse only in some processes: the whole command stops first, with the reason."""
    env = {**os.environ, "DMAE_DATA_DIR": str(tmp_path / "data"),
           "DMAE_BROKER_URL": "redis://127.0.0.1:6379/13"}  # fmt: skip
    env.pop("DMAE_DATABASE_URL", None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([CLI, "serve", "--workers", "2", "--port", str(port)], env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in out.stderr, out.stderr
    assert "serving on" not in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_on_a_port_in_use_says_so_without_claiming_to_serve(tmp_path: Path) -> None:
    """Issue 32: one ``serve`` process on a port in use logged "serving on http://..." and then
    uvicorn's "Address already in use". The socket is now bound first: one error line, exit 2,
    and no "serving on"."""
    env = {**os.environ, "DMAE_DATA_DIR": str(tmp_path / "data")}
    env.pop("DMAE_DATABASE_URL", None)
    env.pop("DMAE_BROKER_URL", None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([CLI, "serve", "--port", str(port)], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert (
        f"dmae-certify serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"
        in out.stderr
    )
    assert "serving on" not in out.stderr and "Traceback" not in out.stderr


def test_serve_workers_share_one_metrics_view(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
    redis_keys_cleaned: None,  # noqa: F811
) -> None:
    """serve --workers 2 on Postgres + Redis: two API processes on one port, and GET /metrics
    from either adds up both (prometheus_client's multiprocess mode)."""
    from test_metrics import samples, total

    env, key = _workers_env(tmp_path, pg_url)
    with serve_process(tmp_path, env, "--workers", "2", "--log-level", "warning") as (base, _):
        h = {"X-API-Key": key}
        for i in range(6):
            r = httpx.post(f"{base}/certify", headers=h, files={"image": ("d.png", digit_png(i))},
                           data={"sigma": "0.25", "n": "100"}, timeout=120)  # fmt: skip
            assert r.status_code == 202, r.text
        seen = [
            total(samples(httpx.get(f"{base}/metrics", timeout=120).text), "dmae_jobs_total",
                  status="queued")
            for _ in range(6)
        ]  # fmt: skip
        assert seen == [6.0] * 6, seen  # whichever process answered, it counted both


def test_a_second_group_is_refused_while_the_first_is_starting() -> None:
    """Each process listens as soon as it has bound its socket, before its app has started, so
    the start-up check of another ``serve --workers`` on the same port fails (before, it passed
    during those seconds and both groups shared the port)."""
    from cli.processes import _check_free, listening_socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    first = listening_socket("127.0.0.1", port)
    try:
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}"):
            _check_free("127.0.0.1", port)
    finally:
        first.close()


def failing_logging(level: str) -> None:
    """A logging setup that fails: the API process exits with code 1 at its start."""
    raise RuntimeError(f"cannot set up logging at {level}")


def test_processes_that_fail_at_start_stop_the_group(tmp_path: Path) -> None:
    """Every process failing right after its start (code 1, not uvicorn's 3) ends the command
    with 1; before, it started them again and again, a traceback each time, for ever."""
    code = (
        "import sys; sys.path[:0] = [sys.argv[1]]\n"
        "from test_service_cli import failing_logging\n"
        "from cli.processes import serve_processes\n"
        "sys.exit(serve_processes(2, '127.0.0.1', int(sys.argv[2]), 'warning', failing_logging))"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), str(port)],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-3000:]
    assert "no API process could start" in out.stderr
    assert out.stderr.count("cannot set up logging") <= 4, out.stderr[-3000:]


def test_a_burst_of_answers_from_stored_jobs_does_not_empty_the_connection_pool(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
    redis_keys_cleaned: None,  # noqa: F811
) -> None:
    """Found by a breaker: a route that ends with its transaction open (a repeated submission
    answered from the stored job, GET /jobs) had it closed in one of the routes' threads
    (DMAE_API_THREADS=4), holding its connection while new routes took more, until 100
    concurrent requests emptied the pool of 40 and the routes waited 30 s for a connection:
    500s. So did 150 GET /jobs, each waiting for a thread to validate its returned model while
    holding its connection. Now a route ends its transaction in its own thread as it returns
    (and the rest end on threads of their own), and an empty pool is a 503."""
    import asyncio

    from service_support import digit_png

    env, key = _workers_env(tmp_path, pg_url)
    env["DMAE_API_THREADS"] = "4"
    with serve_process(tmp_path, env, "--log-level", "warning") as (base, _):
        headers = {"X-API-Key": key}
        form = {"sigma": "0.25", "n": "1000"}
        files = {"image": ("d.png", digit_png(0), "image/png")}
        first = httpx.post(f"{base}/certify", headers=headers, data=form, files=files, timeout=120)
        assert first.status_code == 202, first.text

        async def burst() -> list[tuple[int, str]]:
            limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:

                async def post() -> tuple[int, str]:
                    r = await http.post("/certify", headers=headers, data=form, files=files)
                    return r.status_code, r.json().get("id", r.text)

                async def listing(path: str) -> tuple[int, str]:
                    r = await http.get(path, headers=headers)
                    return r.status_code, str(r.json().get("total", r.text))

                jobs = [listing("/jobs") for _ in range(150)]
                evaluations = [listing("/evaluations") for _ in range(150)]
                return list(
                    await asyncio.gather(*[post() for _ in range(100)], *jobs, *evaluations)
                )

        answers = asyncio.run(burst())
        assert answers[:100] == [(200, first.json()["id"])] * 100, sorted(set(answers[:100]))
        assert answers[100:250] == [(200, "1")] * 150, sorted(set(answers[100:250]))
        assert answers[250:] == [(200, "0")] * 150, sorted(set(answers[250:]))
