"""The deployment files agree with the project and with each other.

There is no Docker engine in CI, so nothing is built or pulled. Instead: the Dockerfile, the
Compose files, ``.env.example`` and ``.dockerignore`` are parsed and checked against what the
project really provides (pyproject pins, the ``dmae-certify`` commands, ``domain.config.Settings``);
the Docker build context is turned into a wheel exactly as ``pip install .`` in the image does;
and ``docker compose config`` validates the Compose files when a Compose binary is installed
(Debian: ``apt-get install -y docker-compose``).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CORE_SERVICES = {"postgres", "redis", "migrate", "api", "worker"}
READINESS_PATH = "/readyz"  # app/routes/health.py: 200 only when the database answers
DMAE_VAR = re.compile(r"\bDMAE_[A-Z0-9_]+\b")


# ---------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]


# One process per GPU, 8 jobs at once feeding its batching engine (docs/DEPLOYMENT.md).
WORKER_COMMAND = [
    "dmae-certify", "worker", "--pool", "threads", "--concurrency", "8", "--metrics-port", "9101",
]  # fmt: skip


def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ``ARG`` defaults and the stages (by name) of the Dockerfile."""
    logical: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest, flags=re.IGNORECASE)
            assert m, f"every stage must be named (FROM image AS name): {line!r}"
            current = stages[m[2]] = Stage(name=m[2], base=m[1])
        elif current is None:
            assert keyword == "ARG", f"only ARG may precede the first FROM: {line!r}"
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            current.instructions.append((keyword, rest))
    return global_args, stages


def compose(name: str = "docker-compose.yml") -> dict[str, Any]:
    data = yaml.safe_load((ROOT / name).read_text())
    assert isinstance(data, dict)
    return data


def env_example() -> dict[str, str]:
    """Variables set in .env.example; each must have a comment line directly above it."""
    values: dict[str, str] = {}
    previous = ""
    for number, raw in enumerate((ROOT / ".env.example").read_text().splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", key), f"line {number}: {raw!r}"
            assert key not in values, f".env.example sets {key} twice"
            assert previous.startswith("#"), f".env.example: {key} has no comment above it"
            values[key] = value
        previous = line
    return values


def settings_fields() -> set[str]:
    """Environment names of every field of domain.config.Settings."""
    try:
        from domain.config import Settings
    except ImportError as exc:  # pragma: no cover - only while domain.config does not exist
        pytest.skip(f"domain.config is not importable ({exc}); cannot check setting names")
    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def pyproject_pin(package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        m = re.fullmatch(rf"{re.escape(package)}\s*==\s*([\w.]+)", dep.strip())
        if m:
            return m[1]
    raise AssertionError(f"pyproject.toml does not pin {package} with ==")


def cli_accepts(argv: list[str]) -> None:
    """The real ``dmae-certify`` parser accepts ``argv`` (argv[0] is the program)."""
    from cli import build_parser

    assert argv[0] == "dmae-certify", argv
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse reports unknown commands/options by exiting
        raise AssertionError(f"dmae-certify does not accept {shlex.join(argv)}") from exc


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` (relative, /-separated) out of the build context."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        regex = re.escape(pat).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        # A pattern also excludes everything below a directory it matches.
        prefixes = ("/".join(parts[: i + 1]) for i in range(len(parts)))
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------


def test_dockerfile_has_an_api_target_and_a_cuda_worker_target() -> None:
    _, stages = dockerfile()
    assert {"api", "worker"} <= set(stages)
    assert stages["api"].base.startswith("python:3.11"), stages["api"].base
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-\w+-ubuntu\d+\.\d+", stages["worker"].base)


def test_dockerfile_pins_the_same_torch_as_pyproject() -> None:
    global_args, stages = dockerfile()
    assert global_args["TORCH_VERSION"] == pyproject_pin("torch")
    assert global_args["TORCHVISION_VERSION"] == pyproject_pin("torchvision")
    for stage in stages.values():
        runs = " ".join(stage.args("RUN"))
        assert '"torch==${TORCH_VERSION}"' in runs, stage.name
        assert '"torchvision==${TORCHVISION_VERSION}"' in runs, stage.name
        assert {"TORCH_VERSION", "TORCHVISION_VERSION"} <= set(stage.args("ARG")), stage.name


def test_worker_cuda_base_matches_the_cuda_build_of_pinned_torch() -> None:
    """torch's wheel names the CUDA toolkit it was built for; the worker base must match it."""
    pin = pyproject_pin("torch")
    if metadata.version("torch").split("+")[0] != pin:
        pytest.skip(f"installed torch {metadata.version('torch')} is not the pinned {pin}")
    toolkit = [r for r in metadata.requires("torch") or [] if r.startswith("cuda-toolkit")]
    if not toolkit:
        pytest.skip("installed torch is a CPU build: it does not name its CUDA toolkit")
    m = re.search(r"==\s*(\d+\.\d+)", toolkit[0])
    assert m, toolkit[0]
    _, stages = dockerfile()
    base_cuda = re.search(r"nvidia/cuda:(\d+\.\d+)\.", stages["worker"].base)
    assert base_cuda and base_cuda[1] == m[1], (stages["worker"].base, toolkit[0])


def test_images_pip_install_the_project_and_run_as_non_root() -> None:
    _, stages = dockerfile()
    for name in ("api", "worker"):
        stage = stages[name]
        assert any(re.search(r"pip install \.(\s|$)", run) for run in stage.args("RUN")), name
        users = stage.args("USER")
        assert users and users[-1] not in {"root", "0"}, f"{name} must end as a non-root USER"
        assert any("useradd" in run and users[-1] in run for run in stage.args("RUN")), name


def test_image_commands_are_real_cli_commands() -> None:
    _, stages = dockerfile()
    api_cmd = json.loads(stages["api"].args("CMD")[-1])
    worker_cmd = json.loads(stages["worker"].args("CMD")[-1])
    assert api_cmd[:2] == ["dmae-certify", "serve"]
    assert worker_cmd == WORKER_COMMAND
    cli_accepts(api_cmd)
    cli_accepts(worker_cmd)
    # The health check probes the port the API listens on.
    port = api_cmd[api_cmd.index("--port") + 1]
    assert str(port) in stages["api"].args("EXPOSE")
    health = stages["api"].args("HEALTHCHECK")
    assert health and f"127.0.0.1:{port}{READINESS_PATH}" in health[-1]


def test_health_checks_probe_the_api_readiness_route() -> None:
    """The probed path is the API's route that answers only when the database does."""
    from app.routes.health import readyz, router

    paths = {getattr(r, "path", None): getattr(r, "endpoint", None) for r in router.routes}
    assert inspect.unwrap(paths[READINESS_PATH]) is readyz  # the route wraps it (ends sessions)


# ---------------------------------------------------------------------------------------------
# docker-compose.yml
# ---------------------------------------------------------------------------------------------


def healthcheck_text(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test)


def test_compose_services_and_health_checks() -> None:
    services = compose()["services"]
    assert set(services) >= CORE_SERVICES
    assert "pg_isready" in healthcheck_text(services["postgres"])
    assert "redis-cli ping" in healthcheck_text(services["redis"])
    assert READINESS_PATH in healthcheck_text(services["api"])
    _, stages = dockerfile()
    assert services["api"]["healthcheck"]["test"][-1] in stages["api"].args("HEALTHCHECK")[-1]


def test_compose_start_order_waits_for_health_and_migrations() -> None:
    services = compose()["services"]

    def conditions(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}

    assert conditions("migrate") == {"postgres": "service_healthy"}
    assert services["migrate"]["restart"] == "no"
    assert conditions("api") == {
        "postgres": "service_healthy",
        "redis": "service_healthy",
        "migrate": "service_completed_successfully",
    }
    assert conditions("worker") == {
        "redis": "service_healthy",
        "migrate": "service_completed_successfully",
    }


def test_compose_commands_images_and_ports() -> None:
    services = compose()["services"]
    _, stages = dockerfile()
    expected = {"migrate": "api", "api": "api", "worker": "worker"}
    for name, target in expected.items():
        assert services[name]["build"] == {"context": ".", "target": target}, name
        assert target in stages
        assert services[name]["env_file"] == ".env", name
        cli_accepts(services[name]["command"])
    assert services["migrate"]["command"] == ["dmae-certify", "db", "upgrade"]
    assert services["worker"]["command"] == WORKER_COMMAND
    api_cmd = services["api"]["command"]
    assert api_cmd[:2] == ["dmae-certify", "serve"]
    assert f"8000:{api_cmd[api_cmd.index('--port') + 1]}" in services["api"]["ports"]


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert isinstance(devices, list)
    return devices


def test_worker_reserves_one_nvidia_gpu_and_can_be_replicated() -> None:
    worker = compose()["services"]["worker"]
    [device] = gpu_devices(worker)
    assert device["driver"] == "nvidia"
    assert device["count"] == 1
    assert "gpu" in device["capabilities"]
    # Replicas cannot share a container name or a host port.
    assert "container_name" not in worker and "ports" not in worker


def test_multi_gpu_override_pins_each_extra_worker_to_its_own_gpu() -> None:
    base = compose()["services"]["worker"]
    extra = compose("docker-compose.gpus.yml")["services"]
    assert extra and not set(extra) & CORE_SERVICES
    seen: set[str] = set()
    for name, service in extra.items():
        [device] = gpu_devices(service)
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert "count" not in device, f"{name}: count would give it GPU 0 again"
        [gpu] = device["device_ids"]
        assert gpu != "0" and gpu not in seen, f"{name}: GPU {gpu} already has a worker"
        seen.add(gpu)
        # Everything but the GPU is the base worker's, so the copies cannot drift apart.
        assert {k: v for k, v in service.items() if k != "deploy"} == {
            k: v for k, v in base.items() if k != "deploy"
        }, name


def test_compose_volumes_are_shared_where_the_settings_point() -> None:
    data = compose()
    services = data["services"]
    env = env_example()
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    for name in ("api", "worker"):
        mounts = dict(v.split(":", 1) for v in services[name]["volumes"])
        assert mounts.get("data") == env["DMAE_DATA_DIR"], name
        assert mounts.get("checkpoints") == env["DMAE_CHECKPOINT_DIR"], name
        assert mounts.get("datasets") == env["DMAE_DATASET_DIR"], name
    assert {"pgdata", "data", "checkpoints", "datasets"} <= set(data["volumes"])


# ---------------------------------------------------------------------------------------------
# .env.example
# ---------------------------------------------------------------------------------------------


def test_env_example_documents_exactly_the_service_settings() -> None:
    documented = {k for k in env_example() if k.startswith("DMAE_")}
    fields = settings_fields()
    assert not fields - documented, f"settings missing from .env.example: {fields - documented}"
    assert not documented - fields, f"not settings of domain.config: {documented - fields}"


def test_deployment_files_use_only_documented_settings() -> None:
    documented = set(env_example())
    for name in ("Dockerfile", "docker-compose.yml", "docker-compose.gpus.yml"):
        used = set(DMAE_VAR.findall((ROOT / name).read_text()))
        assert used <= documented, f"{name} uses undocumented {used - documented}"
        assert used <= settings_fields(), f"{name} uses unknown {used - settings_fields()}"


def test_deployment_doc_lists_every_setting() -> None:
    doc = (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    missing = {k for k in env_example() if f"`{k}`" not in doc}
    assert not missing, f"docs/DEPLOYMENT.md does not describe {missing}"


def test_env_example_values_are_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings_fields()  # skips with the reason while domain.config is not importable
    from domain.config import Settings

    for key, value in env_example().items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert not settings.embedded and not settings.is_sqlite


def test_env_example_database_and_broker_urls_match_the_compose_services() -> None:
    from sqlalchemy.engine import make_url

    env = env_example()
    url = make_url(env["DMAE_DATABASE_URL"])
    assert url.drivername == "postgresql+psycopg"
    assert (url.username, url.password, url.database) == (
        env["POSTGRES_USER"],
        env["POSTGRES_PASSWORD"],
        env["POSTGRES_DB"],
    )
    assert (url.host, url.port or 5432) == ("postgres", 5432)
    assert re.fullmatch(r"redis://redis:6379/\d+", env["DMAE_BROKER_URL"])
    assert {"postgres", "redis"} <= set(compose()["services"])


# ---------------------------------------------------------------------------------------------
# .dockerignore and the build context
# ---------------------------------------------------------------------------------------------


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    patterns = dockerignore_patterns()
    for path in (
        ".env",
        ".git/config",
        ".venv/bin/python",
        "data/dmae.sqlite3",
        "x/__pycache__/a.pyc",
    ):
        assert dockerignored(path, patterns), path
    for path in ("pyproject.toml", "README.md", "domain/config.py", "models/networks.py"):
        assert not dockerignored(path, patterns), path


def test_docker_build_context_installs_a_complete_package(tmp_path: Path) -> None:
    """``pip install .`` of the build context (not an editable install) has every runtime file."""
    patterns = dockerignore_patterns()
    context = tmp_path / "context"
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = Path(dirpath).relative_to(ROOT).as_posix()
        rel = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = [d for d in dirnames if not dockerignored(rel + d, patterns)]
        for f in filenames:
            if not dockerignored(rel + f, patterns):
                (context / rel).mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(dirpath) / f, context / rel / f)
    out = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(context)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = out.glob("dmae_certify-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = [
        p.relative_to(ROOT).as_posix()
        for pattern in (
            "migrations/**/*.py",
            "models/bundled/*.safetensors",
            "models/bundled/*.json",
        )
        for p in ROOT.glob(pattern)
        if "__pycache__" not in p.parts
    ]
    assert any(n.startswith("migrations/versions/") for n in needed)
    missing = [n for n in needed + ["cli/__init__.py", "worker/__init__.py"] if n not in names]
    assert not missing, f"the image would lack {missing}"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "dmae-certify = cli:main" in text


# ---------------------------------------------------------------------------------------------
# docker compose config
# ---------------------------------------------------------------------------------------------


def compose_binary() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.parametrize(
    "files",
    [
        ["docker-compose.yml"],
        ["docker-compose.yml", "docker-compose.gpus.yml"],
        ["--profile", "monitoring", "docker-compose.yml"],
    ],
)
def test_docker_compose_config_accepts_the_files(files: list[str], tmp_path: Path) -> None:
    binary = compose_binary()
    if binary is None:
        pytest.skip("no Compose binary; install it with `apt-get install -y docker-compose`")
    profile = files[:2] if files[0] == "--profile" else []
    files = files[len(profile) :]
    for name in [*files, "Dockerfile"]:
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")  # what a user does first
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DMAE_", "POSTGRES_"))}
    cmd = [*binary, *profile, *(a for f in files for a in ("-f", f)), "config"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # Compose's own reading of the file keeps the GPU reservation and the start conditions.
    services = yaml.safe_load(result.stdout)["services"]
    devices = gpu_devices(services["worker"])
    assert devices[0]["driver"] == "nvidia" and int(devices[0]["count"]) == 1
    api_deps = services["api"]["depends_on"]
    assert api_deps["migrate"]["condition"] == "service_completed_successfully"
    # .env reaches the containers: the API gets the Postgres URL, not the SQLite default.
    assert services["api"]["environment"]["DMAE_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert "prometheus" in services or not profile


# ---------------------------------------------------------------------------------------------
# monitoring (compose profile "monitoring")
# ---------------------------------------------------------------------------------------------

MONITORING = ROOT / "deploy" / "monitoring"


def test_prometheus_scrapes_the_api_and_each_worker_where_they_serve_metrics() -> None:
    services = compose()["services"]
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in config["scrape_configs"]
    }
    assert targets["dmae-api"] == ["api:8000"]
    assert "8000" in services["api"]["command"]
    worker_cmd = services["worker"]["command"]
    port = worker_cmd[worker_cmd.index("--metrics-port") + 1]
    assert targets["dmae-worker"] == [f"worker:{port}"]
    cli_accepts(worker_cmd)
    for job in config["scrape_configs"]:
        assert job["metrics_path"] == "/metrics"
    mounted = [v.split(":")[0] for v in services["prometheus"]["volumes"]]
    assert "./deploy/monitoring/prometheus.yml" in mounted
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]


def test_grafana_dashboard_queries_only_metrics_the_service_exports() -> None:
    """Every metric a panel queries is one this project defines (domain.metrics, or the HTTP
    instrumentation's dmae_http_* names), so a renamed metric breaks this test, not the board."""
    from domain import metrics

    exported = {m._name for m in vars(metrics).values() if hasattr(m, "_name")}
    exported |= {"dmae_queue_depth", "dmae_http_request_duration_seconds", "dmae_http_requests"}
    board = json.loads((MONITORING / "grafana" / "dashboards" / "dmae-certify.json").read_text())
    assert board["panels"], "empty dashboard"
    used = set()
    for panel in board["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\b(dmae_[a-z_]+)", target["expr"]))
    suffixes = ("_total", "_bucket", "_sum", "_count")
    bare = {next((u[: -len(s)] for s in suffixes if u.endswith(s)), u) for u in used}
    assert bare <= exported, bare - exported
    provisioning = MONITORING / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "dmae.yml").read_text())
    mounts = compose()["services"]["grafana"]["volumes"]
    assert (
        f"./deploy/monitoring/grafana/dashboards:{provider['providers'][0]['options']['path']}:ro"
        in mounts
    )


# ---------------------------------------------------------------------------------------------
# .env is docker-compose's file, not the service's
# ---------------------------------------------------------------------------------------------


def test_a_compose_env_in_the_working_folder_does_not_reach_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 32: DEPLOYMENT's first step, ``cp .env.example .env`` in the repository root,
    silently made ``make run`` and the CLI use the compose host ``postgres`` ("failed to
    resolve host 'postgres'"). The service reads only its environment now, and says at
    start-up which ``DMAE_*`` settings a ``.env`` there sets that do not apply."""
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DMAE_", "POSTGRES_"))}
    code = (
        "from domain.config import Settings, unread_env_file; s = Settings(); "
        "print(s.database_url); print(repr(s.broker_url)); print(unread_env_file())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert out[0].startswith("sqlite:///") and "postgres" not in out[0]
    assert out[1] in ("''", "None")
    assert out[2].startswith(".env sets DMAE_DATABASE_URL, DMAE_BROKER_URL, DMAE_QUEUE, ")
    assert "do not apply here" in out[2] and "export them" in out[2]
    # A variable set in the environment is not named: it applies.
    from domain.config import unread_env_file

    (tmp_path / "one.env").write_text("# DMAE_X=1\nDMAE_QUEUE=q\nexport DMAE_DEVICE=cpu\nA=1\n")
    warning = unread_env_file(tmp_path / "one.env")
    assert warning is not None and " sets DMAE_QUEUE, DMAE_DEVICE, which " in warning
    monkeypatch.setenv("DMAE_QUEUE", "q")
    assert " sets DMAE_DEVICE, which " in str(unread_env_file(tmp_path / "one.env"))
    assert unread_env_file(tmp_path / "missing.env") is None


def test_docker_compose_without_env_says_what_to_do(tmp_path: Path) -> None:
    """Without ``.env`` Compose stops with the step to take (the database password has no
    default on purpose)."""
    binary = compose_binary()
    if binary is None:
        pytest.skip("no Compose binary; install it with `apt-get install -y docker-compose`")
    for name in ("docker-compose.yml", "Dockerfile"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DMAE_", "POSTGRES_"))}
    result = subprocess.run([*binary, "config"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert "cp .env.example .env" in result.stderr, result.stderr
