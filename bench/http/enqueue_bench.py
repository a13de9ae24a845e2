"""POST /certify and GET /jobs/{id} under concurrent clients, side by side with their floor.

The floor (``bench/http/enqueue_floor.py``) is a minimal FastAPI app on the same Postgres doing only
the unavoidable work: multipart upload, Pillow decode, sha256, one INSERT (or one SELECT by
primary key). The service is ``dmae-certify serve`` on Postgres + Redis with no worker consuming,
so the figures are the API's alone. Each round runs both cases, in alternating order, with
``--clients`` concurrent clients each posting ``--per-client`` distinct digit PNGs and then
polling each of its jobs ``--polls`` times; it prints requests/s, p50/p95/p99 and the
service/floor ratio of every round, then the median and spread of the ratios. After each round
of a service its jobs are cancelled (``drain``), as workers keeping up would have finished
them, so no round counts the earlier rounds' jobs as active.

    python -m bench.http.enqueue_bench [--clients 50] [--per-client 8] [--rounds 3] [--workers 1]

With ``--against DIR`` the second case is not the floor but the service of another checkout
(``git worktree add --detach DIR HEAD~1``; same migrations), run the same way: a change is
measured side by side with the code it changes, which a noisy machine allows where two separate
runs do not. The ratio is this checkout over that one.

Needs PostgreSQL (``--database``: an admin URL; a throw-away database is created and dropped)
and Redis (``--broker``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CLI = str(Path(sys.executable).parent / "dmae-certify")


DEFAULT_DATABASE = os.environ.get(
    "DMAE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1/test"
)
DEFAULT_BROKER = "redis://127.0.0.1:6379/13"


def default_client() -> str:
    """wrk when installed (C, light on the CPU the servers share), else httpx."""
    return "wrk" if shutil.which("wrk") else "httpx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def distinct_pngs(count: int) -> list[bytes]:
    """``count`` 8x8 digit PNGs that all differ (one pixel carries a counter)."""
    from PIL import Image

    from models.data import load_digits_split

    x, _, _ = load_digits_split("test")
    out = []
    for i in range(count):
        arr = (x[i % len(x)].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        arr[0, 0, :] = [i % 256, (i // 256) % 256, (i // 65536) % 256]
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load(
    base: str,
    post_path: str,
    keys: list[str],
    pngs: list[list[bytes]],
    form: dict[str, str],
    polls: int,
) -> dict[str, Any]:
    """Every client posts its PNGs one after another, then polls each answer's URL."""
    post_lat: list[float] = []
    get_lat: list[float] = []
    bad: dict[int, int] = {}
    urls: list[list[str]] = [[] for _ in keys]
    limits = httpx.Limits(max_connections=len(keys), max_keepalive_connections=len(keys))
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:

        async def poster(c: int) -> None:
            for png in pngs[c]:
                t0 = time.perf_counter()
                r = await http.post(
                    post_path,
                    headers={"X-API-Key": keys[c]},
                    files={"image": ("d.png", png, "image/png")},
                    data=form,
                )
                post_lat.append(time.perf_counter() - t0)
                if r.status_code != 202:
                    bad[r.status_code] = bad.get(r.status_code, 0) + 1
                else:
                    urls[c].append(r.json()["url"])

        async def poller(c: int) -> None:
            for _ in range(polls):
                for url in urls[c]:
                    t0 = time.perf_counter()
                    r = await http.get(url, headers={"X-API-Key": keys[c]})
                    get_lat.append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        bad[r.status_code] = bad.get(r.status_code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(poster(c) for c in range(len(keys))))
        post_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        await asyncio.gather(*(poller(c) for c in range(len(keys))))
        get_s = time.perf_counter() - t0
    return {
        "post_rps": len(post_lat) / post_s,
        "post_p50": quantile(post_lat, 0.50),
        "post_p95": quantile(post_lat, 0.95),
        "post_p99": quantile(post_lat, 0.99),
        "get_rps": len(get_lat) / get_s if get_lat else 0.0,
        "get_p50": quantile(get_lat, 0.50) if get_lat else 0.0,
        "get_p99": quantile(get_lat, 0.99) if get_lat else 0.0,
        "errors": bad,
    }


BOUNDARY = "dmaebenchboundary"


def multipart(png: bytes, form: dict[str, str]) -> bytes:
    """The body of a multipart upload of ``png`` (field ``image``) with the ``form`` fields."""
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="d.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + png
        + b"\r\n"
    ]
    for name, value in form.items():
        parts.append(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            f"{value}\r\n".encode()
        )
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds each of ``pids`` has used so far (gone ones are left out)."""
    tick = os.sysconf("SC_CLK_TCK")
    used = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        used[pid] = (int(fields[11]) + int(fields[12])) / tick
    return used


def cpu_since(before: dict[int, float], now: dict[int, float]) -> float:
    """CPU seconds used between two :func:`cpu_seconds` readings; a process that started in
    between (a PostgreSQL backend for a new pooled connection) counts from 0."""
    return sum(t - before.get(pid, 0.0) for pid, t in now.items())


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (``serve --workers N`` forks)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for child in Path("/proc").glob(f"{p}/task/*/children"):
            todo.extend(int(c) for c in child.read_text().split())
    return out


def postgres_pids() -> list[int]:
    """Every local PostgreSQL process (the server's CPU per request is part of the cost)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/comm"):
        try:
            if stat.read_text().strip() == "postgres":
                pids.append(int(stat.parent.name))
        except OSError:
            continue
    return pids


def wrk_run(
    base: str,
    method: str,
    items: list[tuple[bytes, str, str]],
    seconds: float,
    clients: int,
    folder: Path,
    server_pid: int,
) -> dict[str, Any]:
    """``clients`` connections of wrk (2 threads) sending ``items`` (body, path, key) in turn for
    ``seconds``; its requests/s, latency percentiles (s), and the CPU seconds per request that
    the server (``server_pid`` and its children) and PostgreSQL used meanwhile."""
    data, index = folder / f"{method}.data", folder / f"{method}.index"
    offset = 0
    with data.open("wb") as d, index.open("w") as ix:
        for body, path, key in items:
            d.write(body)
            ix.write(f"{offset} {len(body)} {path} {key}\n")
            offset += len(body)
    script = HERE / "wrk" / "requests.lua"
    duration = f"-d{max(1, round(seconds))}s"
    cmd = ["wrk", "-t2", f"-c{clients}", duration, "--timeout", "30s", "-s", str(script),
           base, "--", method, str(data), str(index), "2"]  # fmt: skip
    cpu0 = cpu_seconds(tree(server_pid)), cpu_seconds(postgres_pids())
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    cpu1 = cpu_seconds(tree(server_pid)), cpu_seconds(postgres_pids())
    line = next(x for x in out.splitlines() if x.startswith("{"))
    r = json.loads(line)
    done = max(1, r["requests"])
    return {
        "requests": r["requests"],
        "cpu_server": cpu_since(cpu0[0], cpu1[0]) / done,
        "cpu_postgres": cpu_since(cpu0[1], cpu1[1]) / done,
        "rps": r["requests"] / (r["duration_us"] / 1e6),
        "p50": r["p50_us"] / 1e6,
        "p95": r["p95_us"] / 1e6,
        "p99": r["p99_us"] / 1e6,
        "errors": {"socket": r["socket_errors"], "status": r["bad_status"]},
    }


def wrk_round(
    case: str,
    base: str,
    path: str,
    pngs: list[bytes],
    form: dict[str, str],
    keys: list[str],
    owners: dict[int, str],
    db_url: str,
    seen: set[str],
    args: argparse.Namespace,
    folder: Path,
    server_pid: int,
) -> dict[str, Any]:
    """POST distinct uploads for ``args.seconds``, then GET what they made for as long."""
    from sqlalchemy import create_engine, text

    items = [(multipart(png, form), path, keys[i % len(keys)]) for i, png in enumerate(pngs)]
    post = wrk_run(base, "POST", items, args.seconds, args.clients, folder, server_pid)
    engine = create_engine(db_url)
    with engine.connect() as conn:
        if path == "/certify":  # the service (either checkout, with --against)
            rows = conn.execute(text("SELECT id, owner_id FROM jobs")).all()
            made = [(f"/jobs/{i}", owners[o]) for i, o in rows if i not in seen]
        else:
            rows = conn.execute(text("SELECT id FROM floor_uploads")).all()
            made = [(f"/floor/{i}", keys[0]) for (i,) in rows if i not in seen]
    engine.dispose()
    seen.update(p.rsplit("/", 1)[1] for p, _ in made)
    get = wrk_run(
        base, "GET", [(b"", p, k) for p, k in made], args.seconds, args.clients, folder, server_pid
    )
    errors = {f"POST {k}": v for k, v in post["errors"].items() if v}
    errors.update({f"GET {k}": v for k, v in get["errors"].items() if v})
    return {
        "post_rps": post["rps"], "post_p50": post["p50"], "post_p95": post["p95"],
        "post_p99": post["p99"], "get_rps": get["rps"], "get_p50": get["p50"],
        "get_p99": get["p99"], "errors": errors,
        "post_cpu_server": post["cpu_server"], "post_cpu_postgres": post["cpu_postgres"],
        "get_cpu_server": get["cpu_server"], "get_cpu_postgres": get["cpu_postgres"],
    }  # fmt: skip


def connections_needed(workers: int, others: int, threads: int, against: bool) -> int:
    """PostgreSQL connections the servers may open at most: per API process one per request
    thread (its pool allows 40), the ``enqueued_at`` marks and start-up; per floor process its
    pool of 40; and this script's own."""
    per_service = min(threads, 40) + 2
    return workers * per_service + others * (per_service if against else 40) + 2


def connection_warning(needed: int, max_connections: int, reserved: int, in_use: int) -> str:
    """A warning when ``needed`` connections may not fit in what the server has left ("")."""
    left = max_connections - reserved - in_use
    if needed <= left:
        return ""
    return (
        f"warning: the servers may open up to {needed} PostgreSQL connections, and the server "
        f"has {left} left (max_connections {max_connections}, {reserved} reserved, {in_use} in "
        "use); requests may fail with 'too many clients': lower --workers or DMAE_API_THREADS, "
        "or raise max_connections"
    )


def drain(db_url: str) -> int:
    """Cancel every queued or running job, as workers keeping up with the queue would have
    finished them: each round then starts, like the first, with no active jobs, so the admission
    count (which reads a key's active jobs, up to the cap + 1) costs what it costs in service.
    Plain SQL, so an older checkout's schema works too. Returns the number of jobs cancelled."""
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    with engine.begin() as conn:
        done = conn.execute(
            text(
                "UPDATE jobs SET status = 'cancelled', finished_at = now() "
                "WHERE status IN ('queued', 'running')"
            )
        ).rowcount
    engine.dispose()
    return int(done)


def make_keys(db_url: str, count: int) -> dict[int, str]:
    """``count`` client API keys, {key id: token}, written with plain SQL (the api_keys table
    of every release: a token's sha256 is what is stored), so an older checkout's
    ``dmae-certify serve`` can be measured by the same script."""
    import hashlib
    import secrets

    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    made = {}
    with engine.begin() as conn:
        for i in range(count):
            token = "dmae_" + secrets.token_urlsafe(32)
            row = conn.execute(
                text(
                    "INSERT INTO api_keys (name, key_prefix, key_hash, is_admin, created_at) "
                    "VALUES (:name, :prefix, :hash, false, now()) RETURNING id"
                ),
                {"name": f"client-{i}", "prefix": token[:11],
                 "hash": hashlib.sha256(token.encode()).hexdigest()},
            ).scalar_one()  # fmt: skip
            made[int(row)] = token
    engine.dispose()
    return made


def migration_head(checkout: Path) -> str | None:
    """The last Alembic revision of a checkout's ``migrations`` folder."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(checkout / "migrations")).get_current_head()


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"server not ready: {url}")


def parser() -> argparse.ArgumentParser:
    """The command line: load shape, servers, PostgreSQL/Redis, comparison and client."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--clients", type=int, default=50, help="concurrent clients")
    p.add_argument("--per-client", type=int, default=8, help="uploads per client")
    p.add_argument("--polls", type=int, default=4, help="GETs of each job per client")
    p.add_argument("--rounds", type=int, default=3, help="rounds of both cases")
    p.add_argument("--workers", type=int, default=1, help="serve --workers")
    p.add_argument(
        "--floor-workers",
        type=int,
        default=None,
        help="uvicorn --workers of the floor (None: the same as --workers)",
    )
    p.add_argument(
        "--database",
        default=DEFAULT_DATABASE,
        help="admin URL of a PostgreSQL server (a throw-away database is made on it)",
    )
    p.add_argument("--broker", default=DEFAULT_BROKER, help="Redis URL")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--profile",
        default=None,
        help="run the service under `py-spy record --gil --format raw` writing collapsed stacks "
        "here (--gil: only the thread holding the GIL, which is what limits the throughput of "
        "one process)",
    )
    p.add_argument(
        "--against",
        default=None,
        metavar="DIR",
        help="compare with the service of the checkout in DIR (same migrations) instead of the "
        "floor",
    )
    p.add_argument(
        "--keys", type=int, default=0, help="API keys shared by the clients (0: one per client)"
    )
    p.add_argument(
        "--client",
        choices=("wrk", "httpx"),
        default=default_client(),
        help="load generator: wrk (C, light on the CPU the servers share; Debian package) or "
        "httpx (Python asyncio); wrk when installed",
    )
    p.add_argument("--seconds", type=float, default=8.0, help="wrk: seconds per measurement")
    return p


def parse_args() -> argparse.Namespace:
    """The arguments; exits (status 2) when --against names no checkout with our migrations."""
    p = parser()
    args = p.parse_args()
    if args.against:
        if not (Path(args.against) / "app" / "main.py").is_file():
            p.error(f"--against {args.against}: not a dmae-certify checkout (no app/main.py there)")
        ours, theirs = migration_head(ROOT), migration_head(Path(args.against))
        if ours != theirs:
            p.error(
                f"--against {args.against}: its migrations end at {theirs}, this checkout's at "
                f"{ours}; both services share one database, so compare commits with the same "
                "migrations"
            )
    return args


def create_database(args: argparse.Namespace, floor_workers: int) -> tuple[str, str]:
    """Create a throw-away database on ``--database``'s server, warning when the servers may
    open more connections than it has left; returns (admin URL, database name)."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(args.database).set(drivername="postgresql")
    admin_url = admin.render_as_string(hide_password=False)
    name = f"dmae_enqueue_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        threads = int(os.environ.get("DMAE_API_THREADS", "40"))
        needed = connections_needed(args.workers, floor_workers, threads, bool(args.against))

        def scalar(sql: str) -> int:
            row = conn.execute(sql).fetchone()
            assert row is not None
            return int(row[0])

        max_connections = scalar("SHOW max_connections")
        reserved = scalar("SHOW superuser_reserved_connections")
        in_use = scalar("SELECT count(*) FROM pg_stat_activity")
        if warning := connection_warning(needed, max_connections, reserved, in_use):
            print(warning, file=sys.stderr)
    return admin_url, name


def server_env(args: argparse.Namespace, data: Path, url: str, queue: str) -> dict[str, str]:
    """The environment of both servers: the throw-away database and queue, no admission or
    rate limit ever reached."""
    return {
        **os.environ,
        "DMAE_DATA_DIR": str(data),
        "DMAE_DATABASE_URL": url,
        "DMAE_BROKER_URL": args.broker,
        "DMAE_QUEUE": queue,
        "DMAE_DEVICE": "cpu",
        "DMAE_FLOOR_DATABASE_URL": url,
        # Admission control still runs on every submission, never refusing; no worker drains
        # the queue during a round, and `drain` ends the round's jobs after it.
        "DMAE_MAX_ACTIVE_JOBS": str(10**9),
        "DMAE_RATE_LIMIT_REQUESTS": "10000000",  # still counted per request, never reached
    }


@dataclass
class Servers:
    """The two cases' servers once ready: ``service`` and ``floor`` (the floor app, or with
    --against the other checkout's service, labelled ``other``)."""

    procs: list[subprocess.Popen[bytes]]  # service first, then floor
    ports: dict[str, int]
    serves: dict[str, bool]  # answers POST /certify, GET /jobs/{id} (else the floor's paths)
    other: str  # "floor" or "baseline"


def start_servers(
    args: argparse.Namespace,
    env: dict[str, str],
    data: Path,
    floor_workers: int,
    procs: list[subprocess.Popen[bytes]],
) -> Servers:
    """Start both servers (appending each to ``procs`` at once, for the caller to stop) and
    wait until each answers; logs go to DATA/CASE.log."""
    service_port, floor_port = free_port(), free_port()
    # The second case ("floor" in the JSON): the floor app, or the other checkout's service
    # (its code first on the import path; the CLI entry point is this one's).
    other = "baseline" if args.against else "floor"
    serves = {"service": True, "floor": bool(args.against)}  # POST /certify, GET /jobs/{id}
    serve = [CLI, "serve", "--log-level", "warning"]
    commands = {
        "service": serve + ["--port", str(service_port)]
        + (["--workers", str(args.workers)] if args.workers > 1 else []),
        "floor": (serve + ["--port", str(floor_port)] if args.against else [
            sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT),
            "bench.http.enqueue_floor:app", "--port", str(floor_port), "--log-level", "warning",
        ]) + (["--workers", str(floor_workers)] if floor_workers > 1 else []),
    }  # fmt: skip
    envs = {"service": env, "floor": env}
    if args.against:
        path_to = str(Path(args.against).resolve())
        envs["floor"] = {**env, "PYTHONPATH": os.pathsep.join(
            [path_to] + [x for x in [env.get("PYTHONPATH")] if x])}  # fmt: skip
    ports = {"service": service_port, "floor": floor_port}
    for case, cmd in commands.items():
        log = data / f"{case}.log"
        procs.append(
            subprocess.Popen(cmd, env=envs[case], stdout=log.open("wb"), stderr=subprocess.STDOUT)
        )
        ready = "/readyz" if serves[case] else "/floor/none"
        wait_ready(f"http://127.0.0.1:{ports[case]}{ready}", procs[-1], log)
    return Servers(procs, ports, serves, other)


def start_profiler(profile: str, pid: int) -> subprocess.Popen[bytes]:
    """py-spy sampling ``pid`` (and its children) while the service serves; it writes
    ``profile`` on SIGINT."""
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw"]
        + ["--subprocesses", "--gil", "-r", "200", "-o", profile]
        + ["--pid", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run_rounds(
    args: argparse.Namespace,
    servers: Servers,
    owners: dict[int, str],
    url: str,
    data: Path,
    floor_workers: int,
) -> dict[str, list[dict[str, Any]]]:
    """``--rounds`` rounds of both cases, in alternating order; each case's figures per round."""
    distinct = list(owners.values())
    keys = [distinct[i % len(distinct)] for i in range(args.clients)]
    total = args.clients * args.per_client
    per_case = int(args.seconds * 800) if args.client == "wrk" else total  # > any rate
    pngs = distinct_pngs(per_case * args.rounds * 2)
    seen: set[str] = set()
    results: dict[str, list[dict[str, Any]]] = {"service": [], "floor": []}
    what = (
        f"wrk, {args.clients} connections, {args.seconds:g} s of distinct uploads then "
        "as long polling the jobs they made"
        if args.client == "wrk"
        else f"httpx, {args.clients} clients x {args.per_client} uploads, {args.polls} polls each"
    )
    print(
        f"{what}; serve --workers {args.workers}, {servers.other} --workers {floor_workers}"
        + (f" (checkout {args.against})" if args.against else "")
        + "; Postgres + Redis, no worker consuming"
    )
    batch = 0
    for r in range(args.rounds):
        order = ["floor", "service"] if r % 2 == 0 else ["service", "floor"]
        for case in order:
            mine = pngs[batch * per_case : (batch + 1) * per_case]
            batch += 1
            base = f"http://127.0.0.1:{servers.ports[case]}"
            path = "/certify" if servers.serves[case] else "/floor"
            form = {"sigma": "0.25", "n": "1000"} if servers.serves[case] else {}
            if args.client == "wrk":
                pid = servers.procs[0 if case == "service" else 1].pid
                out = wrk_round(case, base, path, mine, form, distinct, owners, url, seen,
                                args, data, pid)  # fmt: skip
            else:
                per = [mine[c :: args.clients] for c in range(args.clients)]
                out = asyncio.run(load(base, path, keys, per, form, args.polls))
            results[case].append(out)
            if servers.serves[case]:
                out["drained"] = drain(url)
            print_round(r, case if case == "service" else servers.other, out)
    return results


def print_round(r: int, label: str, out: dict[str, Any]) -> None:
    """One case's line of round ``r`` (0-based): requests/s, latencies (ms), CPU with wrk."""
    print(
        f"round {r + 1} {label:8s}: POST {out['post_rps']:6.1f} req/s p50 "
        f"{out['post_p50'] * 1e3:6.1f} p95 {out['post_p95'] * 1e3:6.1f} p99 "
        f"{out['post_p99'] * 1e3:6.1f} ms | GET {out['get_rps']:6.1f} req/s p99 "
        f"{out['get_p99'] * 1e3:6.1f} ms | errors {out['errors'] or 'none'}"
    )
    if "post_cpu_server" in out:
        print(
            "  CPU ms per request: POST server {:.2f} + postgres {:.2f}, GET server "
            "{:.2f} + postgres {:.2f}".format(
                *(1e3 * out[f"{m}_cpu_{w}"] for m in ("post", "get")
                  for w in ("server", "postgres"))
            )
        )  # fmt: skip


def summarise(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Service/other ratios of requests/s (median, min, max over rounds) and each case's
    medians over rounds."""
    summary: dict[str, Any] = {
        "clients": args.clients,
        "per_client": args.per_client,
        "against": args.against or "floor",
    }
    for what in ("post_rps", "get_rps"):
        ratios = [
            s[what] / f[what] for s, f in zip(results["service"], results["floor"], strict=True)
        ]
        summary[f"{what}_ratio"] = {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        }
    for case in ("service", "floor"):
        for what in ("post_rps", "post_p99", "get_rps", "get_p99", "post_cpu_server",
                     "get_cpu_server"):  # fmt: skip
            if all(what in x for x in results[case]):  # CPU: measured with wrk only
                summary[f"{case}_{what}"] = statistics.median(x[what] for x in results[case])
    return summary


def print_summary(summary: dict[str, Any], other: str) -> None:
    """The ratios, the service's p99 latencies and (with wrk) the server CPU per request."""
    post, get = summary["post_rps_ratio"], summary["get_rps_ratio"]
    print(
        f"service/{other} requests/s: "
        f"POST median {post['median']:.2f} (range {post['min']:.2f}-{post['max']:.2f}); "
        f"GET median {get['median']:.2f} (range {get['min']:.2f}-{get['max']:.2f})"
    )
    print(
        f"service POST p99 {summary['service_post_p99'] * 1e3:.0f} ms (median of rounds), "
        f"GET p99 {summary['service_get_p99'] * 1e3:.0f} ms"
    )
    if "service_post_cpu_server" in summary:
        print(
            "server CPU ms per request (median of rounds): service POST {:.2f} GET {:.2f}; "
            f"{other} "
            "POST {:.2f} GET {:.2f}".format(
                *(1e3 * summary[f"{c}_{m}_cpu_server"] for c in ("service", "floor")
                  for m in ("post", "get"))
            )
        )  # fmt: skip


def clean_up(
    procs: list[subprocess.Popen[bytes]],
    broker: str,
    queue: str,
    admin_url: str,
    name: str,
    data: Path,
) -> None:
    """Stop the servers, delete the queue's Redis keys, drop the database and DATA."""
    import psycopg
    import redis

    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    client = redis.Redis.from_url(broker)
    for k in client.scan_iter(f"*{queue}*"):
        client.delete(k)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    shutil.rmtree(data, ignore_errors=True)


def main() -> int:
    args = parse_args()
    from sqlalchemy.engine import make_url

    floor_workers = args.workers if args.floor_workers is None else args.floor_workers
    admin_url, name = create_database(args, floor_workers)
    url = make_url(args.database).set(database=name).render_as_string(hide_password=False)
    data = Path(tempfile.mkdtemp(prefix="dmae-enqueue-"))
    queue = f"enqueue-{uuid.uuid4().hex[:8]}"
    env = server_env(args, data, url, queue)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run([CLI, "db", "upgrade"], env=env, check=True, capture_output=True)
        owners = make_keys(url, args.keys or args.clients)
        servers = start_servers(args, env, data, floor_workers, procs)
        spy = start_profiler(args.profile, procs[0].pid) if args.profile else None
        results = run_rounds(args, servers, owners, url, data, floor_workers)
        summary = summarise(args, results)
        print_summary(summary, servers.other)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        if args.json:
            Path(args.json).write_text(
                json.dumps({"summary": summary, "rounds": results}, indent=2)
            )
    finally:
        clean_up(procs, args.broker, queue, admin_url, name, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
