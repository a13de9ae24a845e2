"""deploy/kubernetes checked offline: every kustomization renders (``kubectl kustomize``), the
core objects validate strictly against the Kubernetes schemas (``kubernetes-validate``), the
KEDA and Prometheus Operator objects have the structure their controllers need, and the
rendered objects agree with the project (routes, settings, Celery's shutdown, the version,
Secrets by name only). Then the shutdown for real: a worker started with the manifest's
command gets SIGTERM mid-job, as the kubelet sends it at a scale-down.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
# Every folder holding a kustomization: the top one (the base) and each overlay.
KUSTOMIZATIONS = sorted(str(p.parent.relative_to(KUBE)) for p in KUBE.rglob("kustomization.yaml"))
# Kinds from CRDs (KEDA, Prometheus Operator): not in the core schemas, checked by the tests.
CUSTOM = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
# Oldest Kubernetes release the manifests are meant for, and the newest schemas installed.
K8S_VERSIONS = ("1.30.0", "latest")
SECRETS = {"dmae-database", "dmae-broker", "dmae-signing"}

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed"
)


@cache
def rendered(folder: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUBE / folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, f"kubectl kustomize {folder}: {out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def find(objs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_specs(objs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objs:
        if o["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield o["metadata"]["name"], o["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(objs: tuple[dict[str, Any], ...], deployment: str) -> dict[str, Any]:
    return find(objs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]


def settings_map(objs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    return dict(find(objs, "ConfigMap", "dmae-settings")["data"])


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def compose_command(service: str) -> list[str]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return list(compose["services"][service]["command"])


# --------------------------------------------------------------------------------------------
# Rendering and schemas
# --------------------------------------------------------------------------------------------


def test_the_base_and_every_overlay_are_found() -> None:
    assert KUSTOMIZATIONS[0] == "." and {"base", "overlays/dev"} <= set(KUSTOMIZATIONS)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_renders_offline(folder: str) -> None:
    objs = rendered(folder)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Job", "ConfigMap", "Service", "NetworkPolicy"} <= kinds
    assert all(o["metadata"].get("namespace") == "dmae" for o in objs if o["kind"] != "Namespace")


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_core_objects_validate_strictly(folder: str) -> None:
    import kubernetes_validate

    versions = [v if v != "latest" else kubernetes_validate.latest_version() for v in K8S_VERSIONS]
    for obj in rendered(folder):
        what = f"{obj['kind']}/{obj['metadata']['name']} in {folder}"
        if (obj["apiVersion"], obj["kind"]) in CUSTOM:
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(
                    f"{what} (Kubernetes {version}): {exc.message} at {list(exc.path)}"
                ) from None


def test_strict_validation_catches_a_misspelt_field() -> None:
    """The check above can fail: a probe field one letter off is refused."""
    import kubernetes_validate

    api = yaml.safe_load(yaml.safe_dump(find(rendered("."), "Deployment", "dmae-api")))
    probe = api["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["periodSecond"] = probe.pop("periodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError, match="periodSecond"):
        kubernetes_validate.validate(api, "1.30.0", strict=True)


def test_only_known_custom_resources() -> None:
    for folder in KUSTOMIZATIONS:
        for obj in rendered(folder):
            group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
            if "." in group and not group.endswith("k8s.io"):
                assert (obj["apiVersion"], obj["kind"]) in CUSTOM, obj["kind"]


# --------------------------------------------------------------------------------------------
# KEDA and ServiceMonitors (custom resources: their structure, by hand)
# --------------------------------------------------------------------------------------------


def _worker_concurrency(objs: tuple[dict[str, Any], ...]) -> int:
    args = container(objs, "dmae-worker")["command"]
    return int(args[args.index("--concurrency") + 1])


@pytest.mark.parametrize("folder", [".", "overlays/monitoring", "overlays/scale-to-zero"])
def test_keda_scales_the_workers_on_the_celery_queue(folder: str) -> None:
    objs = rendered(folder)
    scaled = find(objs, "ScaledObject", "dmae-worker")["spec"]
    assert set(scaled) <= {
        "scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
        "cooldownPeriod", "advanced", "triggers", "idleReplicaCount", "fallback",
    }  # fmt: skip
    target = scaled["scaleTargetRef"]
    assert target.get("apiVersion", "apps/v1") == "apps/v1"
    assert target.get("kind", "Deployment") == "Deployment"
    find(objs, "Deployment", target["name"])
    assert 0 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    assert scaled["minReplicaCount"] == (0 if folder == "overlays/scale-to-zero" else 1)
    behavior = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert set(behavior) <= {"scaleUp", "scaleDown"}
    for direction in behavior.values():
        for policy in direction["policies"]:
            assert policy["type"] in ("Pods", "Percent") and policy["value"] > 0

    [trigger] = scaled["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata are strings"
    assert meta["listName"] == settings_map(objs)["DMAE_QUEUE"]
    assert int(meta["listLength"]) == _worker_concurrency(objs)
    assert int(meta["activationListLength"]) == 0 and int(meta["databaseIndex"]) >= 0
    assert not {"address", "password", "host"} & set(meta), "connection from the Secret only"

    auth = find(objs, "TriggerAuthentication", trigger["authenticationRef"]["name"])["spec"]
    params = {ref["parameter"] for ref in auth["secretTargetRef"]}
    assert params == {"address", "password"}
    assert {ref["name"] for ref in auth["secretTargetRef"]} == {"dmae-broker"}


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_autoscaled_deployments_leave_the_replica_count_to_the_autoscaler(folder: str) -> None:
    """A Deployment that an HPA or a KEDA ScaledObject scales must not set spec.replicas: each
    `kubectl apply` (every release) would reset it, e.g. 8 busy GPU workers to 1, the other 7
    sent SIGTERM before the autoscaler scales them back (Kubernetes' HPA documentation says
    to leave replicas out of such a manifest)."""
    objs = rendered(folder)
    scaled = {
        o["spec"]["scaleTargetRef"]["name"]
        for o in objs
        if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
    }
    assert scaled, "nothing autoscaled?"
    for name in sorted(scaled):
        assert "replicas" not in find(objs, "Deployment", name)["spec"], (folder, name)


def test_the_dev_overlay_needs_no_keda_and_no_gpu() -> None:
    objs = rendered("overlays/dev")
    assert not [o for o in objs if o["apiVersion"].startswith("keda.sh")]
    worker = container(objs, "dmae-worker")
    assert "nvidia.com/gpu" not in worker["resources"].get("limits", {})
    assert {"name": "DMAE_DEVICE", "value": "cpu"} in worker["env"]
    assert worker["image"].startswith("dmae-certify-api:")  # the image with CPU torch
    for name in ("postgres", "redis"):
        find(objs, "Service", name)
        find(objs, "Deployment", name)


def test_service_monitors_select_services_and_ports() -> None:
    objs = rendered("overlays/monitoring")
    monitors = [o for o in objs if o["kind"] == "ServiceMonitor"]
    assert {m["metadata"]["name"] for m in monitors} == {"dmae-api", "dmae-worker"}
    services = [o for o in objs if o["kind"] == "Service"]
    for monitor in monitors:
        wanted = monitor["spec"]["selector"]["matchLabels"]
        matched = [s for s in services if wanted.items() <= s["metadata"]["labels"].items()]
        assert len(matched) == 1, monitor["metadata"]["name"]
        ports = {p["name"] for p in matched[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in ports and endpoint["path"] == "/metrics"


# --------------------------------------------------------------------------------------------
# The manifests against the project
# --------------------------------------------------------------------------------------------


def test_commands_are_the_compose_commands_plus_the_api_processes() -> None:
    objs = rendered(".")
    assert container(objs, "dmae-worker")["command"] == compose_command("worker")
    api = container(objs, "dmae-api")["command"]
    assert api == [*compose_command("api"), "--workers", "2"]
    assert {"name": "DMAE_API_THREADS", "value": "4"} in container(objs, "dmae-api")["env"]
    [job] = [o for o in objs if o["kind"] == "Job"]
    migrate = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert migrate == compose_command("migrate")


def test_every_command_parses_with_the_cli() -> None:
    from cli import build_parser

    for folder in KUSTOMIZATIONS:
        for _, spec in pod_specs(rendered(folder)):
            for c in containers(spec):
                if c.get("command", [""])[0] == "dmae-certify":
                    build_parser().parse_args(c["command"][1:])


def test_probes_point_at_routes_the_app_serves(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient
    from service_support import service_settings

    from cli.asgi import create_app

    app = create_app(service_settings(tmp_path / "data"))
    served = {path for path, ops in app.openapi()["paths"].items() if "get" in ops}
    api = container(rendered("."), "dmae-api")
    probes = {k: api[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    command = api["command"]
    assert ports[probes["readinessProbe"]["port"]] == int(command[command.index("--port") + 1])
    for folder in KUSTOMIZATIONS:
        for _, spec in pod_specs(rendered(folder)):
            for c in containers(spec):
                for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                    get = c.get(kind, {}).get("httpGet")
                    if get is not None:
                        assert get["path"] in served, (c["name"], kind, get["path"])
                        assert get["port"] in {p["name"] for p in c["ports"]}
    with TestClient(app) as client:  # and each answers 200 on a working service
        for probe in probes.values():
            assert client.get(probe["path"]).status_code == 200, probe


def _dmae_variables(objs: tuple[dict[str, Any], ...]) -> dict[str, str | None]:
    found: dict[str, str | None] = dict(settings_map(objs))
    for _, spec in pod_specs(objs):
        for c in containers(spec):
            for env in c.get("env", []):
                if env["name"].startswith("DMAE_"):
                    found.setdefault(env["name"], env.get("value"))
    return found


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_every_dmae_variable_is_a_setting_with_a_valid_value(folder: str) -> None:
    from domain.config import Settings

    variables = _dmae_variables(rendered(folder))
    unknown = [v for v in variables if v[5:].lower() not in Settings.model_fields]
    assert not unknown, f"not fields of domain.config.Settings: {unknown}"
    given: dict[str, Any] = {k[5:].lower(): v for k, v in variables.items() if v is not None}
    Settings(_env_file=None, **given)  # type: ignore[call-arg]  # each value parses


def test_shared_settings_and_mounts_agree() -> None:
    objs = rendered(".")
    data = settings_map(objs)
    for name in ("dmae-api", "dmae-worker"):
        c = container(objs, name)
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        for key in ("DMAE_DATA_DIR", "DMAE_CHECKPOINT_DIR", "DMAE_DATASET_DIR"):
            assert data[key] in mounts, (name, key)
        for key in ("DMAE_SIGNING_KEY", "DMAE_SEED_SECRET_FILE"):
            folder = str(Path(data[key]).parent)
            assert mounts.get(folder) == "signing", (name, key)
        assert {"configMapRef": {"name": "dmae-settings"}} in c["envFrom"]
    init = [
        find(objs, "Deployment", d)["spec"]["template"]["spec"]["initContainers"][0]["command"]
        for d in ("dmae-api", "dmae-worker")
    ]
    assert init[0] == init[1], "one wait-for-schema, the same in both"


def test_worker_grace_period_fits_the_celery_shutdown() -> None:
    """SIGTERM is Celery's warm shutdown (nothing remaps it); a task is acknowledged only when it
    has finished, and redelivered when its worker is lost; the grace period covers a full
    worker's jobs at the measured speed, and Redis's visibility timeout is far above it."""
    from domain.config import Settings
    from worker.celery_app import make_celery

    objs = rendered(".")
    data = settings_map(objs)
    spec = find(objs, "Deployment", "dmae-worker")["spec"]["template"]["spec"]
    grace = spec["terminationGracePeriodSeconds"]
    worker = spec["containers"][0]
    assert "preStop" not in worker.get("lifecycle", {})
    assert not [e for e in worker.get("env", []) if e["name"] == "REMAP_SIGTERM"]

    settings = Settings(_env_file=None, broker_url="redis://x:6379/0")  # type: ignore[call-arg]
    settings = settings.model_copy(
        update={"visibility_timeout_s": int(data["DMAE_VISIBILITY_TIMEOUT_S"])}
    )
    conf = make_celery(settings).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    # Celery's soft shutdown applies to a cold shutdown only; if set it must end in time.
    assert (conf.worker_soft_shutdown_timeout or 0) < grace
    assert conf.broker_transport_options["visibility_timeout"] >= 10 * grace
    # 8 concurrent n=N_MAX (+ n0=100) ViT-B/16 jobs on one GPU at 9,010 samples/s (fp16, one
    # H200, docs/PERFORMANCE.md "GPU: prepared, not run"): about 89 s; the grace is 3x that.
    full_worker_s = _worker_concurrency(objs) * (settings.n_max + 100) / 9010
    assert grace >= 3 * full_worker_s
    # A killed worker's job is re-queued well inside the visibility timeout.
    requeued_after = float(data["DMAE_STALE_AFTER_S"]) + settings.sweep_interval_s
    assert requeued_after < settings.visibility_timeout_s


def test_one_gpu_per_worker() -> None:
    for folder in (".", "overlays/monitoring", "overlays/scale-to-zero"):
        worker = container(rendered(folder), "dmae-worker")
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"name": "DMAE_DEVICE", "value": "cuda"} in worker["env"]


def test_image_tags_are_the_package_version() -> None:
    version = project_version()
    for folder in KUSTOMIZATIONS:
        objs = rendered(folder)
        for _, spec in pod_specs(objs):
            for c in containers(spec):
                name, _, tag = c["image"].rpartition(":")
                if name.rsplit("/", 1)[-1].startswith("dmae-certify"):
                    assert tag == version, (folder, c["name"], c["image"])
        [job] = [o for o in objs if o["kind"] == "Job"]
        assert job["metadata"]["name"].endswith(version)


_SECRET_LOOKING = re.compile(r"-----BEGIN|://[^/\s:@]+:[^/\s@]+@|password\s*[:=]\s*\S", re.I)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS)
def test_secrets_are_referenced_by_name_only(folder: str) -> None:
    objs = rendered(folder)
    assert not [o for o in objs if o["kind"] == "Secret"], "no Secret objects in the manifests"
    text = yaml.safe_dump_all(objs)
    assert not _SECRET_LOOKING.search(text), _SECRET_LOOKING.search(text)
    for key in ("DMAE_DATABASE_URL", "DMAE_BROKER_URL", "DMAE_RATE_LIMIT_URL"):
        assert key not in settings_map(objs)
    names: set[str] = set()
    for _, spec in pod_specs(objs):
        names |= {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        for c in containers(spec):
            for env in c.get("env", []):
                if env["name"] in ("DMAE_DATABASE_URL", "DMAE_BROKER_URL", "POSTGRES_PASSWORD"):
                    assert set(env) == {"name", "valueFrom"}, env
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    names.add(ref["name"])
    assert names == SECRETS


def test_workers_reach_only_postgres_and_redis() -> None:
    objs = rendered(".")
    policy = find(objs, "NetworkPolicy", "dmae-worker")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    egress = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert egress == {53, 5432, 6379}
    ingress = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert ingress == {p["containerPort"] for p in container(objs, "dmae-worker")["ports"]}
    api = find(objs, "NetworkPolicy", "dmae-api")["spec"]
    assert {p["port"] for rule in api["ingress"] for p in rule["ports"]} == {8000}


# --------------------------------------------------------------------------------------------
# For real: the schema wait, and a worker's SIGTERM mid-job
# --------------------------------------------------------------------------------------------


def _cli(command: list[str]) -> list[str]:
    """The manifest's argv, with `dmae-certify` from this environment (the image's PATH)."""
    assert command[0] in ("dmae-certify", "python")
    exe = "dmae-certify" if command[0] == "dmae-certify" else "python"
    return [str(Path(sys.executable).parent / exe), *command[1:]]


def _wait_output(proc: subprocess.Popen[str], text: str, timeout: float = 120.0) -> str:
    """Lines of ``proc``'s stdout until one contains ``text`` (a deadline, no fixed sleep)."""
    import selectors
    import time

    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while text not in seen:
            left = deadline - time.monotonic()
            assert left > 0 and sel.select(left), f"no {text!r} within {timeout} s:\n{seen}"
            line = proc.stdout.readline()
            assert line, f"exited ({proc.wait()}) before {text!r}:\n{seen}"
            seen += line
    return seen


def test_wait_for_schema_holds_until_the_migration_job_ran() -> None:
    """The init container waits on an empty database, and lets the pod start once the Job's
    `dmae-certify db upgrade` has run."""
    from fault_support import BlockableDatabase, _admin

    objs = rendered(".")
    spec = find(objs, "Deployment", "dmae-api")["spec"]["template"]["spec"]
    init = spec["initContainers"][0]["command"]
    [job] = [o for o in objs if o["kind"] == "Job"]
    upgrade = job["spec"]["template"]["spec"]["containers"][0]["command"]

    db = BlockableDatabase(prefix="dmae_k8s")  # created empty here, not migrated
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{db.name}"')
    env = {**os.environ, "DMAE_DATABASE_URL": db.url}
    try:
        waiting = subprocess.Popen(
            _cli(init), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=ROOT,
        )  # fmt: skip
        try:
            assert "run `dmae-certify db upgrade`" in _wait_output(
                waiting, "waiting for the database schema"
            )
            assert waiting.poll() is None
            subprocess.run(_cli(upgrade), env=env, check=True, timeout=300, capture_output=True)
            _wait_output(waiting, "database schema ready", timeout=300)
            assert waiting.wait(60) == 0
        finally:
            if waiting.poll() is None:
                waiting.kill()
                waiting.wait()
    finally:
        db.drop()


class ManifestWorker:
    """The worker Deployment's container command, run as a process of its own: the only change
    is the metrics port (a free one, since other test sessions share this machine)."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path, log: Path):
        from fault_support import free_port

        argv = _cli(command)
        argv[argv.index("--metrics-port") + 1] = str(free_port())
        self.argv, self.log_path = argv, log
        self._log: IO[bytes] = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            argv, env={**os.environ, **env}, cwd=cwd, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def sigterm(self) -> None:
        """What the kubelet does first: SIGTERM to the container's main process only."""
        self.proc.send_signal(signal.SIGTERM)

    def sigkill(self) -> None:
        """What the kubelet does when the grace period is over: SIGKILL to everything."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.sigkill()
        self._log.close()


@pytest.fixture
def k8s_stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A private Redis and a migrated database of its own, the API in-process, and a factory
    of workers started with the manifest's command."""
    from fastapi.testclient import TestClient
    from fault_support import BlockableDatabase, PrivateRedis
    from service_support import make_checkpoint, service_settings
    from test_service_embedded import Service
    from test_service_faults import WORKER_ENV

    from cli.asgi import create_app

    objs = rendered(".")
    spec = find(objs, "Deployment", "dmae-worker")["spec"]["template"]["spec"]
    data = tmp_path / "data"
    checkpoint = make_checkpoint(data / "checkpoints" / "tiny.safetensors")
    queue = f"dmae-k8s-{uuid.uuid4().hex[:8]}"
    workers: list[ManifestWorker] = []
    with BlockableDatabase(prefix="dmae_k8s") as db, PrivateRedis() as broker:
        # Test-speed heartbeats and sweep on the CPU; the manifest's own visibility timeout.
        env = {
            **WORKER_ENV,
            "DMAE_VISIBILITY_TIMEOUT_S": settings_map(objs)["DMAE_VISIBILITY_TIMEOUT_S"],
            "DMAE_DATABASE_URL": db.url,
            "DMAE_BROKER_URL": broker.url,
            "DMAE_QUEUE": queue,
            "DMAE_DATA_DIR": str(data),
        }

        def start() -> ManifestWorker:
            n = len(workers)
            workers.append(
                ManifestWorker(spec["containers"][0]["command"], env, tmp_path, tmp_path / f"w{n}")
            )
            return workers[-1]

        settings = service_settings(
            data, database_url=db.url, broker_url=broker.url, queue=queue,
            max_attempts=int(WORKER_ENV["DMAE_MAX_ATTEMPTS"]), rate_limit_requests=0,
        )  # fmt: skip
        app = create_app(settings)
        try:
            with TestClient(app) as client:
                svc = Service(client, app, checkpoint)
                assert svc.register().status_code == 201
                yield {
                    "svc": svc,
                    "start": start,
                    "grace": spec["terminationGracePeriodSeconds"],
                    "checkpoint": checkpoint,
                }
        finally:
            for w in workers:
                w.close()


def _job(svc: Any, url: str) -> dict[str, Any]:
    return dict(svc.client.get(url, headers=svc.h(svc.alice)).json())


def _wait_job(svc: Any, url: str, ok: Any, what: str, logs: Any, timeout: float) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + timeout
    while not ok(job := _job(svc, url)):
        assert time.monotonic() < deadline, f"{what}: {job}\n{logs()}"
        time.sleep(0.05)
    return job


def _certificates(svc: Any, job_id: str) -> int:
    from sqlalchemy import func, select

    from domain.store.tables import Certificate

    with svc.app.state.db.session() as s:
        query = select(func.count()).select_from(Certificate).where(Certificate.job_id == job_id)
        return int(s.scalar(query) or 0)


def test_sigterm_mid_job_finishes_the_job_then_the_worker_exits(
    k8s_stack: dict[str, Any],
) -> None:
    """A scale-down's SIGTERM while a job runs: Celery's warm shutdown lets the job finish, its
    one certificate is the core's, and the worker exits 0 within the grace period."""
    import time

    from service_support import SIGMA, assert_same_certificate, digit_png, reference

    svc = k8s_stack["svc"]
    worker: ManifestWorker = k8s_stack["start"]()
    png = digit_png(5)
    job = svc.submit(svc.alice, png, seed="51", n0="20", n="5000").json()
    _wait_job(
        svc, job["url"], lambda j: j["status"] == "running" and j["progress"]["done"],
        "never ran", worker.log, timeout=180,
    )  # fmt: skip
    worker.sigterm()
    assert _job(svc, job["url"])["status"] == "running", "the job ended before the SIGTERM"
    t0 = time.monotonic()
    try:
        rc = worker.proc.wait(k8s_stack["grace"])
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after the grace period:\n{worker.log()}") from None
    assert rc == 0, worker.log()
    assert time.monotonic() - t0 < k8s_stack["grace"]
    done = _job(svc, job["url"])  # finished by this worker before it exited, none other ran
    assert done["status"] == "succeeded" and done["attempts"] == 1, (done, worker.log())
    assert _certificates(svc, job["id"]) == 1
    expected = reference(
        k8s_stack["checkpoint"], png, sigma=SIGMA, alpha=0.001, n0=20, n=5000,
        seed=done["seed"], batch_size=64,
    )  # fmt: skip
    assert_same_certificate(done["certificate"], expected)
    assert "Warm shutdown" in worker.log()


def test_job_outliving_the_grace_period_is_completed_once_by_another_worker(
    k8s_stack: dict[str, Any],
) -> None:
    """The job is still running when the grace period ends: the kubelet's SIGKILL loses the
    worker, and another worker (started from the same manifest) runs the job again and makes
    its only certificate."""
    from service_support import digit_png

    svc = k8s_stack["svc"]
    first: ManifestWorker = k8s_stack["start"]()
    job = svc.submit(svc.alice, digit_png(6), seed="52", n0="20", n="20000").json()
    _wait_job(
        svc, job["url"], lambda j: j["status"] == "running" and j["progress"]["done"],
        "never ran", first.log, timeout=180,
    )  # fmt: skip
    second: ManifestWorker = k8s_stack["start"]()
    first.sigterm()
    _wait_job(
        svc, job["url"], lambda j: "Warm shutdown" in first.log() or j["status"] != "running",
        "no warm shutdown", first.log, timeout=60,
    )  # fmt: skip
    first.sigkill()  # the grace period is over (shortened here: the job cannot finish in it)
    killed = _job(svc, job["url"])
    assert killed["status"] == "running" and killed["attempts"] == 1, killed

    def logs() -> str:
        return f"first:\n{first.log()[-3000:]}\nsecond:\n{second.log()[-3000:]}"

    done = _wait_job(
        svc, job["url"], lambda j: j["status"] in ("succeeded", "failed"),
        "not completed", logs, timeout=600,
    )  # fmt: skip
    assert done["status"] == "succeeded" and done["attempts"] == 2, (done, logs())
    assert _certificates(svc, job["id"]) == 1
    assert second.proc.poll() is None, logs()


def test_manifest_worker_command_is_shell_free() -> None:
    """The kubelet execs the command as given (no shell): SIGTERM reaches Celery itself."""
    command = container(rendered("."), "dmae-worker")["command"]
    assert command == shlex.split(shlex.join(command)) and command[0] == "dmae-certify"


def test_the_documented_install_commands_wait_long_enough_and_parse() -> None:
    """docs/DEPLOYMENT.md's Kubernetes commands as kubectl takes them: `kubectl wait` gives up
    after 30 s by default (less than the first pull of the image and a migration), and
    `kubectl rollout status` refuses more than one resource ("only supported on individual
    resources ... 2 resources were found")."""
    text = (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    section = text[text.index("## Kubernetes") :]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    joined = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    lines = [" ".join(shlex.split(line, comments=True)) for line in joined]
    waits = [line for line in lines if line.startswith("kubectl") and " wait " in line]
    rollouts = [line for line in lines if " rollout status " in line]
    assert waits and rollouts
    for line in waits + rollouts:
        assert "--timeout=" in line, line
    for line in rollouts:
        args = shlex.split(line)
        names = [a for a in args[args.index("status") + 1 :] if not a.startswith("-")]
        assert len(names) == 1, line
