"""Evaluations on the embedded default (SQLite + in-process runner): a whole test set certified
through the service, one job per image made by the code of POST /certify.

- digits:test with skip 12 (30 images, n = 1,000) on the bundled digits-s0.25: certified
  accuracy at r = 0 >= 0.9, a 30-row TSV in the CLI's format whose curve is the API's, a PNG;
  submitting it again re-uses every certificate;
- an uploaded zip of an ImageFolder keeps its folder names as labels, and each image's job is
  the one POST /certify makes of the same file;
- a zip whose member escapes its folder is refused with 4xx and nothing is written outside the
  data folder; admission, owner-only access, cancelling, predict/decide summaries.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_support import (  # noqa: F401 - pg_url and tiny_checkpoint are fixtures
    OLD_KEY_AND_MODEL,
    digit_png,
    pg_url,
    reset_postgres,
    service_settings,
    tiny_checkpoint,
    wait_for,
)
from sqlalchemy import func, select
from test_service_embedded import Service

from cli.asgi import create_app
from domain.store.tables import Certificate, Evaluation, EvaluationItem, Job
from models.data import load_digits_split
from models.evaluate import certified_accuracy, default_radii, read_tsv
from models.smoothing import max_radius

SMALL = {"sigma": "0.25", "n0": "20", "n": "200"}


@pytest.fixture(scope="module")
def bundled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The embedded service with the bundled digits models and 4 runner threads."""
    data = tmp_path_factory.mktemp("eval-bundled") / "data"
    app = create_app(service_settings(data, register_bundled=True, runner_threads=4))
    with TestClient(app) as client:
        yield Service(client, app, Path())


@pytest.fixture
def service(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[Service]:  # noqa: F811
    app = create_app(service_settings(tmp_path / "data", runner_threads=2))
    with TestClient(app) as client:
        svc = Service(client, app, tiny_checkpoint)
        assert svc.register().status_code == 201
        yield svc


def evaluate(svc: Service, key: str, files: Any = None, **form: str) -> Any:
    return svc.client.post("/evaluations", headers=svc.h(key), data=form, files=files)


def finished(svc: Service, key: str, url: str, timeout: float = 120) -> dict[str, Any]:
    return wait_for(svc.client.get, url, key, timeout=timeout,
                    until=("succeeded", "failed", "cancelled"))  # fmt: skip


def zipped(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


def count(svc: Service, table: Any) -> int:
    with svc.app.state.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)


def test_digits_test_set_with_the_bundled_model(bundled: Service, tmp_path: Path) -> None:
    svc, key = bundled, bundled.alice
    form = {"dataset": "digits:test", "model": "digits-s0.25", "n": "1000", "skip": "12"}
    r = evaluate(svc, key, **form)
    assert r.status_code == 202, r.text
    assert r.json()["url"] == f"/evaluations/{r.json()['id']}"
    ev = finished(svc, key, r.json()["url"])
    assert ev["status"] == "succeeded", ev
    assert ev["progress"] == {"images_done": 30, "images_failed": 0, "images_cancelled": 0,
                              "images_total": 30,
                              "samples_done": 30 * 1100, "samples_total": 30 * 1100}  # fmt: skip
    curve = ev["certified_accuracy"]
    assert curve[0]["radius"] == 0.0 and curve[0]["accuracy"] >= 0.9
    assert [c["radius"] for c in curve] == default_radii(max_radius(0.25, 1000, 0.001))
    assert ev["max_radius"] == max_radius(0.25, 1000, 0.001)

    tsv = svc.client.get(ev["results_url"], headers=svc.h(key))
    assert tsv.status_code == 200
    path = tmp_path / "results.tsv"
    path.write_bytes(tsv.content)
    rows = read_tsv(path)  # the CLI's own reader: the same format
    assert tsv.text.splitlines()[0].startswith("idx\tlabel\tpredict\tradius\tcorrect\ttime")
    assert len(rows) == 30 and [r.idx for r in rows] == list(range(0, 360, 12))
    _, labels, _ = load_digits_split("test")
    assert [r.label for r in rows] == [int(labels[i]) for i in range(0, 360, 12)]
    radii = [c["radius"] for c in curve]
    assert certified_accuracy(rows, radii) == [c["accuracy"] for c in curve]
    assert ev["clean_accuracy"] == sum(r.correct for r in rows) / 30
    acr = sum(r.radius for r in rows if r.correct) / 30
    assert ev["average_certified_radius"] == pytest.approx(acr, rel=1e-12)
    assert ev["abstention_rate"] == sum(r.predict == -1 for r in rows) / 30
    assert all(r.n == 1000 and r.n0 == 100 and r.bound == "clopper-pearson" for r in rows)

    png = svc.client.get(ev["plot_url"], headers=svc.h(key))
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).format == "PNG"

    # The same evaluation again: no new noise, the same certificates, done at once.
    certificates = count(svc, Certificate)
    again = evaluate(svc, key, **form)
    assert again.status_code == 202 and again.json()["id"] != ev["id"]
    assert again.json()["status"] == "succeeded" and count(svc, Certificate) == certificates
    reused = again.json()  # all re-used: no work of its own, finished when created
    assert reused["time"] == {"compute_s": 0.0, "wall_s": 0.0}
    assert reused["finished_at"] == reused["created_at"] > ev["finished_at"]
    same = svc.client.get(again.json()["results_url"], headers=svc.h(key)).text
    assert same == tsv.text


def test_an_uploaded_zip_keeps_folder_names_as_labels(service: Service, tmp_path: Path) -> None:
    """Folder names are the model's class names (digit-0 ... digit-9 for the tiny model): the
    labels are the model's indices of them, and every image's job is the one POST /certify
    makes of the same file (one implementation of a job's identity)."""
    members = {"digit-7/b.png": digit_png(2), "digit-3/a.png": digit_png(0),
               "digit-3/c.png": digit_png(1)}  # fmt: skip
    archive = zipped(members)
    r = evaluate(service, service.alice, files={"archive": ("set.zip", archive)}, **SMALL)
    assert r.status_code == 202, r.text
    ev = finished(service, service.alice, r.json()["url"])
    assert ev["status"] == "succeeded" and ev["source"] == "archive:set.zip"
    rows = read_tsv_text(service.client.get(ev["results_url"], headers=service.h(service.alice)))
    assert [(r.idx, r.name, r.label) for r in rows] == [
        (0, "digit-3/a.png", 3), (1, "digit-3/c.png", 3), (2, "digit-7/b.png", 7),
    ]  # fmt: skip
    with service.app.state.db.session() as s:
        job_ids = s.scalars(
            select(EvaluationItem.job_id)
            .where(EvaluationItem.evaluation_id == ev["id"])
            .order_by(EvaluationItem.position)
        ).all()
    for job_id, name in zip(job_ids, ["digit-3/a.png", "digit-3/c.png", "digit-7/b.png"],
                            strict=True):  # fmt: skip
        single = service.submit(service.alice, members[name])
        assert single.status_code == 200 and single.json()["id"] == job_id
        assert (
            single.json()["certificate"]["tensor_sha256"]
            == rows[job_ids.index(job_id)].tensor_sha256
        )
    # A tar.gz of the same folder under a top folder: the same jobs again, nothing new drawn.
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(f"test/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    again = evaluate(
        service, service.alice, files={"archive": ("set.tgz", out.getvalue())}, **SMALL
    )
    assert again.status_code == 202, again.text
    assert again.json()["status"] == "succeeded"
    assert list(Path(service.app.state.settings.data_dir, "evaluations").iterdir()) == []


def read_tsv_text(response: Any) -> list[Any]:
    from models.evaluate import Row

    assert response.status_code == 200, response.text
    return [Row.parse(line) for line in response.text.splitlines()[1:]]


def test_a_member_escaping_its_folder_writes_nothing_outside(
    service: Service, tmp_path: Path
) -> None:
    data = Path(service.app.state.settings.data_dir)
    outside = sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(data))
    inside = {p for p in data.rglob("*") if "evaluations" not in p.parts}
    jobs = count(service, Job)
    for name in ("../../escaped.png", "/tmp/escaped-abs.png", "digit-3/../../escaped2.png"):
        archive = zipped({"digit-3/a.png": digit_png(0), name: digit_png(1)})
        r = evaluate(service, service.alice, files={"archive": ("x.zip", archive)}, **SMALL)
        assert r.status_code == 422, r.text
        assert "escapes its folder" in r.json()["detail"] or "absolute" in r.json()["detail"]
    assert sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(data)) == outside
    assert not list(Path("/tmp").glob("escaped*")) and not list(tmp_path.rglob("escaped*"))
    now = {p for p in data.rglob("*") if "evaluations" not in p.parts}
    assert {p for p in now - inside if p.suffix not in (".sqlite3-wal", ".sqlite3-shm")} == set()
    assert list((data / "evaluations").iterdir()) == []  # the per-evaluation folders are gone
    assert count(service, Job) == jobs and count(service, Evaluation) == 0


def test_refusals_say_what_is_wrong(service: Service) -> None:
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"archive": ("x.zip", zipped({"cat/a.png": digit_png(0)}))}, 422,
         "'cat' are not classes of the model; name each folder by a class (its classes are: "
         "digit-0, digit-1"),
        ({"archive": ("x.zip", zipped({"digit-3/a.png": b"not an image"}))}, 415,
         "digit-3/a.png: not a supported image"),
        ({"archive": ("x.zip", digit_png(0))}, 415, "not a zip or tar archive"),
    ]  # fmt: skip
    for files, status, words in cases:
        r = evaluate(service, service.alice, files=files, **SMALL)
        assert r.status_code == status and words in r.json()["detail"], r.text
    forms: list[tuple[dict[str, str], str]] = [
        ({"dataset": "digits:valid"}, "digits:test, mnist:train and mnist:test"),
        ({"dataset": "../secret"}, "is outside the server's dataset folder"),
        ({"dataset": "nope"}, "no dataset folder 'nope'"),
        (
            {"dataset": "digits:test", "skip": "0"},
            "skip: Input should be greater than or equal to 1",
        ),
        ({"dataset": "digits:test", "max": "0"}, "max: Input should be greater than or equal to 1"),
        ({"dataset": "digits:test", "n": "5"}, "n=5 is too small"),
        ({"dataset": "digits:test", "mode": "decide"}, "mode=decide needs target_radius"),
        ({}, "give exactly one of: dataset (on the server) or archive (an upload)"),
    ]
    for form, words in forms:
        r = evaluate(service, service.alice, **{**SMALL, **form})
        assert r.status_code == 422 and words in r.json()["detail"], (form, r.text)
    assert count(service, Evaluation) == 0 and count(service, Job) == 0


def test_archive_images_are_checked_exactly_as_uploads(service: Service) -> None:
    """Every hostile upload of tests/hostile_corpus.py, inside an archive next to a good image:
    the evaluation gets the status and sentence POST /certify gets for the same bytes (named
    after the member), and nothing is stored."""
    from hostile_corpus import VALID_FORM, corpus

    uploads = [
        c for c in corpus(digit_png(0), "")
        if c.path == "/certify" and "files" in c.kw and c.kw["data"] == VALID_FORM
    ]  # fmt: skip
    assert len(uploads) >= 15
    for case in uploads:
        data = case.kw["files"]["image"][1]
        single = service.client.post("/certify", headers=service.h(service.alice),
                                     files={"image": ("x.png", data)}, data=SMALL)  # fmt: skip
        assert single.status_code == case.expect, (case.name, single.text)
        archive = zipped({"digit-3/a.png": digit_png(0), "digit-3/bad.png": data})
        r = evaluate(service, service.alice, files={"archive": ("x.zip", archive)}, **SMALL)
        assert r.status_code == case.expect, (case.name, r.text)
        assert r.json()["detail"] == f"digit-3/bad.png: {single.json()['detail']}", case.name
    assert count(service, Evaluation) == 0 and count(service, Job) == 0


def test_a_server_side_image_folder(service: Service) -> None:
    root = Path(service.app.state.settings.datasets) / "mine"
    for folder, i in (("digit-1", 0), ("digit-1", 1), ("digit-5", 2)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / f"{i}.png").write_bytes(digit_png(i))
    r = evaluate(service, service.alice, dataset="mine", **SMALL)
    assert r.status_code == 202, r.text
    ev = finished(service, service.alice, r.json()["url"])
    rows = read_tsv_text(service.client.get(ev["results_url"], headers=service.h(service.alice)))
    assert [(r.name, r.label) for r in rows] == [("digit-1/0.png", 1), ("digit-1/1.png", 1),
                                                 ("digit-5/2.png", 5)]  # fmt: skip
    (root / "digit-5" / "bomb.png").write_bytes(big_png(7000, 6000))
    r = evaluate(service, service.alice, dataset="mine", **SMALL)
    assert r.status_code == 413 and "digit-5/bomb.png" in r.json()["detail"], r.text


def big_png(w: int, h: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (w, h)).save(out, "PNG")
    return out.getvalue()


def test_admission_counts_evaluations_not_their_jobs(tmp_path: Path, tiny_checkpoint: Path) -> None:  # noqa: F811
    settings = service_settings(
        tmp_path / "data", runner_threads=1, max_active_jobs=2, max_active_evaluations=1,
        max_evaluation_images=4,
    )  # fmt: skip
    app = create_app(settings)
    with TestClient(app) as client:
        svc = Service(client, app, tiny_checkpoint)
        svc.register()
        slow = {"sigma": "0.25", "n0": "10", "n": "100000"}
        first = evaluate(svc, svc.alice, dataset="digits:test", max="3", **slow)
        assert first.status_code == 202, first.text
        # A second evaluation in progress is one too many ...
        second = evaluate(svc, svc.alice, dataset="digits:test", skip="2", max="3", **slow)
        assert second.status_code == 429 and "too many evaluations in progress" in second.text
        assert second.headers["Retry-After"]
        # ... but single submissions are still admitted: the evaluation's 3 jobs are not counted.
        for seed in ("1", "2"):
            assert svc.submit(svc.alice, digit_png(0), seed=seed, **slow).status_code == 202
        assert svc.submit(svc.alice, digit_png(0), seed="3", **slow).status_code == 429
        # Another client is not affected; too many images is refused up front.
        assert evaluate(svc, svc.bob, dataset="digits:test", max="3", **slow).status_code == 202
        big = evaluate(svc, svc.admin, dataset="digits:test", max="5", **slow)
        assert big.status_code == 422 and "more than the limit of 4 per evaluation" in big.text
        # Once cancelled, it no longer counts.
        assert client.delete(first.json()["url"], headers=svc.h(svc.alice)).status_code == 200
        again = evaluate(svc, svc.alice, dataset="digits:test", skip="2", max="3", **slow)
        assert again.status_code == 202, again.text
        for key in (svc.alice, svc.bob):
            for ev in client.get("/evaluations", headers=svc.h(key)).json()["items"]:
                if ev["status"] in ("queued", "running"):
                    client.delete(ev["url"], headers=svc.h(key))
        for job in client.get("/jobs?status=queued", headers=svc.h(svc.alice)).json()["items"]:
            client.delete(job["url"], headers=svc.h(svc.alice))
        for job in client.get("/jobs?status=running", headers=svc.h(svc.alice)).json()["items"]:
            client.delete(job["url"], headers=svc.h(svc.alice))


def test_owner_only_listing_and_cancel(service: Service) -> None:
    slow = {"sigma": "0.25", "n0": "10", "n": "100000"}
    mine = evaluate(service, service.alice, dataset="digits:test", max="3", **slow).json()
    url = mine["url"]
    for path in (url, f"{url}/results.tsv", f"{url}/plot.png"):
        r = service.client.get(path, headers=service.h(service.bob))
        assert r.status_code == 404 and r.json()["detail"] == f"evaluation {mine['id']!r} not found"
    assert service.client.delete(url, headers=service.h(service.bob)).status_code == 404
    assert service.client.get("/evaluations", headers=service.h(service.bob)).json()["total"] == 0
    page = service.client.get("/evaluations", headers=service.h(service.alice)).json()
    assert page["total"] == 1 and page["items"][0]["id"] == mine["id"]

    wait_for(service.client.get, url, service.alice, until=("running",))
    r = service.client.delete(url, headers=service.h(service.alice))
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    ev = r.json()
    assert ev["cancelled_at"] and ev["progress"]["images_cancelled"] == 3
    assert ev["progress"]["images_failed"] == 0
    again = service.client.delete(url, headers=service.h(service.alice))
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    plot = service.client.get(f"{url}/plot.png", headers=service.h(service.alice))
    assert plot.status_code == 409 and "no image has a certificate yet" in plot.json()["detail"]
    # Submitted again: the cancelled images are queued anew under the same seeds (same jobs).
    with service.app.state.db.session() as s:
        before = {j.id: j.seed for j in s.scalars(select(Job)).all()}
    redo = evaluate(service, service.alice, dataset="digits:test", max="3", **slow).json()
    with service.app.state.db.session() as s:
        after = {j.id: (j.seed, j.status) for j in s.scalars(select(Job)).all()}
    assert set(after) == set(before) and all(after[i][0] == before[i] for i in before)
    assert redo["status"] in ("queued", "running")
    service.client.delete(redo["url"], headers=service.h(service.alice))


def test_the_job_history_can_leave_out_or_keep_only_the_jobs_of_evaluations(
    service: Service,
) -> None:
    """One evaluation's per-image jobs no longer drown a person's own requests (issue: "Jobs 1
    to 20 of 407"): GET /jobs?evaluations=exclude lists single requests and replays only,
    =only the evaluations' jobs, and the default (include) every job as before. Each listed
    job names the evaluations it serves; a job shared by two evaluations is listed once."""
    key, h = service.alice, service.h(service.alice)
    first = finished(service, key, evaluate(service, key, dataset="digits:test", max="3",
                                            **SMALL).json()["url"])  # fmt: skip
    second = finished(service, key, evaluate(service, key, dataset="digits:test", max="4",
                                             **SMALL).json()["url"])  # fmt: skip
    assert first["status"] == second["status"] == "succeeded"
    single = service.submit(key, digit_png(40)).json()
    service.wait(key, single["url"])

    def listed(**query: str) -> dict[str, Any]:
        r = service.client.get("/jobs", headers=h, params={"limit": "100", **query})
        assert r.status_code == 200, r.text
        return dict(r.json())

    every, mine, of_evaluations = listed(), listed(evaluations="exclude"), listed(
        evaluations="only")  # fmt: skip
    assert every == listed(evaluations="include")  # the default is the listing as it was
    assert every["total"] == 5 and [j["id"] for j in mine["items"]] == [single["id"]]
    assert mine["total"] == 1 and mine["items"][0]["evaluations"] == []
    assert of_evaluations["total"] == 4 == len(of_evaluations["items"])
    served = {j["id"]: j["evaluations"] for j in of_evaluations["items"]}
    assert sorted(map(len, served.values())) == [1, 2, 2, 2]  # 3 images shared, 1 not
    assert all(second["id"] in ids for ids in served.values())
    assert {j["id"] for j in every["items"]} == set(served) | {single["id"]}
    done = listed(evaluations="exclude", status="succeeded")
    assert done["total"] == 1 and listed(evaluations="only", status="queued")["total"] == 0
    assert service.client.get(f"/jobs/{single['id']}", headers=h).json()["evaluations"] is None
    bad = service.client.get("/jobs?evaluations=hide", headers=h)
    assert bad.status_code == 422 and "evaluations" in bad.text


def test_predict_and_decide_evaluations(service: Service) -> None:
    form = {"dataset": "digits:test", "max": "4", "sigma": "0.25", "n": "300"}
    predict = finished(service, service.alice, evaluate(
        service, service.alice, mode="predict", **form).json()["url"])  # fmt: skip
    assert predict["status"] == "succeeded" and predict["certified_accuracy"] is None
    assert predict["n0"] == 0 and 0 <= predict["clean_accuracy"] <= 1
    plot = service.client.get(predict["plot_url"], headers=service.h(service.alice))
    assert plot.status_code == 409 and "no curve" in plot.json()["detail"]

    asked = evaluate(service, service.alice, mode="decide", target_radius="0.1", **form)
    decide = finished(service, service.alice, asked.json()["url"])
    assert decide["status"] == "succeeded", decide
    rows = read_tsv_text(service.client.get(decide["results_url"],
                                            headers=service.h(service.alice)))  # fmt: skip
    d = decide["decisions"]
    assert d["certified"] == sum(r.decision == "certified" for r in rows) / 4
    assert d["n_used_mean"] == sum(r.n_used for r in rows) / 4
    assert d["certified"] + d["not_certified"] + d["undecided"] == pytest.approx(1.0)
    plot = service.client.get(decide["plot_url"], headers=service.h(service.alice))
    assert plot.status_code == 409 and "answers at one radius" in plot.json()["detail"]


# ---------------------------------------------------------------- migration 0006


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.sqlite3'}"
    url: str = request.getfixturevalue("pg_url")
    reset_postgres(url)
    return url


def test_migration_0006_keeps_jobs_inputs_and_certificates(database: str) -> None:
    """Up from 0005 and back: the jobs, their inputs and certificates stay (no table is
    recreated), and evaluations link to jobs."""
    import sqlalchemy as sa

    from domain.store import migrate
    from domain.store.db import make_engine

    migrate.upgrade(database, "0005")
    engine = make_engine(database)
    with engine.begin() as conn:
        for statement in OLD_KEY_AND_MODEL:
            conn.execute(sa.text(statement))
        conn.execute(sa.text(
            "INSERT INTO jobs (id, owner_id, request_key, mode, checkpoint_id, model_name, sigma, "
            "alpha, n0, n, seed, input_sha256, tensor_sha256, input_record, input_shape, status, "
            "progress_done, progress_total, attempts, created_at, seed_source) VALUES ('j', 1, "
            "'k', 'certify', 1, 'm', 0.25, 0.001, 100, 1000, 7, 'b', 't', '{}', '[3, 8, 8]', "
            "'succeeded', 0, 0, 1, CURRENT_TIMESTAMP, 'derived')"
        ))  # fmt: skip
        conn.execute(sa.text(
            "INSERT INTO job_inputs (job_id, shape, data) VALUES ('j', '[3, 8, 8]', :d)"
        ), {"d": b"\x00" * 768})  # fmt: skip
        conn.execute(sa.text(
            "INSERT INTO certificates (job_id, abstained, radius, body, created_at) "
            "VALUES ('j', false, 0.5, '{\"radius\": 0.5}', CURRENT_TIMESTAMP)"
        ))  # fmt: skip

    def counts() -> tuple[int, ...]:
        with engine.connect() as conn:
            row = conn.execute(sa.text(
                "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM job_inputs), "
                "(SELECT count(*) FROM certificates)"
            )).one()  # fmt: skip
        return tuple(int(v) for v in row)

    migrate.upgrade(database)
    assert counts() == (1, 1, 1)
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO evaluations (id, owner_id, source, mode, checkpoint_id, model_name, "
            "classes, sigma, alpha, n0, n, skip, total, created_at) VALUES ('e', 1, "
            "'digits:test', 'certify', 1, 'm', '[]', 0.25, 0.001, 100, 1000, 1, 1, "
            "CURRENT_TIMESTAMP)"
        ))  # fmt: skip
        conn.execute(sa.text(
            "INSERT INTO evaluation_items (evaluation_id, position, idx, name, label, job_id) "
            "VALUES ('e', 0, 0, 'digits:0', 7, 'j')"
        ))  # fmt: skip
    migrate.downgrade(database, "0005")
    with engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
    assert not {"evaluations", "evaluation_items"} & tables
    assert counts() == (1, 1, 1)
    engine.dispose()


# ---------------------------------------------------------------- admission under a race


def _race(url: str, tmp_path: Path, checkpoint: Path, admit: Any, cap: int, racers: int) -> int:
    """``racers`` threads submit distinct evaluations for one key at once; returns how many
    were stored. On Postgres each racer waits at a barrier after writing its evaluation and
    before the admission count, so the counts overlap (SQLite's write lock already serialises
    the writers: a barrier there would deadlock)."""
    import shutil
    import threading

    from domain import registry
    from domain.errors import ServiceError
    from domain.keys import Caller, create_key
    from domain.services import evaluations
    from domain.services.submissions import Params
    from domain.store import migrate
    from domain.store.db import get_database

    migrate.upgrade(url)
    settings = service_settings(tmp_path / "data", database_url=url, max_active_evaluations=cap)
    db = get_database(url)
    shutil.copy(checkpoint, tmp_path / "tiny.safetensors")
    with db.session() as s:
        registry.register(
            s, location=str(tmp_path / "tiny.safetensors"), name="tiny-s0.25", default=True
        )
        key, _ = create_key(s, "racer")
        s.commit()
        caller = Caller(key.id, False)
    barrier = threading.Barrier(racers, timeout=300)
    codes: list[int] = []

    def held_admit(session: Any, owner_id: int, settings: Any) -> None:
        if not settings.is_sqlite:
            barrier.wait()
        admit(session, owner_id, settings)

    def racer(i: int) -> None:
        params = Params(sigma=0.25, n0=20, n=200, alpha=0.001 + i * 1e-5)  # distinct jobs
        request = evaluations.Request(params, dataset="digits:test", max_images=2)
        with db.session() as s:
            try:
                evaluations.submit(s, caller, request, settings)
                codes.append(202)
            except ServiceError as exc:
                codes.append(exc.status_code)

    original = evaluations.admit
    evaluations.admit = held_admit
    try:
        threads = [threading.Thread(target=racer, args=(i,)) for i in range(racers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        evaluations.admit = original
    with db.session() as s:
        stored = int(s.scalar(select(func.count()).select_from(Evaluation)) or 0)
    db.dispose()
    assert len(codes) == racers and set(codes) <= {202, 429}, codes
    assert codes.count(202) == stored
    return stored


def test_the_evaluation_cap_holds_under_concurrent_submissions(
    database: str,
    tmp_path: Path,
    tiny_checkpoint: Path,  # noqa: F811
) -> None:
    """8 evaluations of one key race; the cap of 2 admits exactly 2, on SQLite and Postgres."""
    from domain.services import evaluations

    assert _race(database, tmp_path, tiny_checkpoint, evaluations.admit, cap=2, racers=8) == 2


def test_the_race_test_catches_an_unlocked_evaluation_count(
    pg_url: str,  # noqa: F811
    tmp_path: Path,
    tiny_checkpoint: Path,  # noqa: F811
) -> None:
    """Teeth: the same count without the key-row lock lets more racers in than the cap."""
    from domain.errors import ServiceError
    from domain.services import evaluations

    reset_postgres(pg_url)

    def unlocked_admit(session: Any, owner_id: int, settings: Any) -> None:
        if evaluations.active_evaluations(session, owner_id) > settings.max_active_evaluations:
            session.rollback()
            raise ServiceError(429, "over the cap")

    assert _race(pg_url, tmp_path, tiny_checkpoint, unlocked_admit, cap=2, racers=8) > 2


def test_a_cancelled_evaluations_images_submitted_one_by_one_count_against_the_job_cap(
    tmp_path: Path,
    tiny_checkpoint: Path,  # noqa: F811
) -> None:
    """Found by a breaker: the cap counted no job of any evaluation, so re-submitting a
    cancelled evaluation's images one by one re-queued all of them past the cap of single jobs
    (30 of 30 with a cap of 5). A job whose evaluations are all cancelled is a single job again;
    one of an evaluation not cancelled brings that evaluation back under its own cap."""
    settings = service_settings(
        tmp_path / "data", runner_threads=1, max_active_jobs=2, max_active_evaluations=1,
        max_evaluation_images=6,
    )  # fmt: skip
    app = create_app(settings)
    slow = {"sigma": "0.25", "n0": "10", "n": "100000"}
    pngs = [digit_png(i) for i in range(5)]
    with TestClient(app) as client:
        svc = Service(client, app, tiny_checkpoint)
        svc.register()
        h = svc.h(svc.alice)
        archive = zipped({f"digit-{i}/{i}.png": png for i, png in enumerate(pngs)})
        ev = evaluate(svc, svc.alice, files={"archive": ("a.zip", archive)}, **slow)
        assert ev.status_code == 202, ev.text
        assert client.delete(ev.json()["url"], headers=h).status_code == 200
        codes = [svc.submit(svc.alice, png, **slow).status_code for png in pngs]
        assert codes == [202, 202, 429, 429, 429], codes  # re-queued: 2, the cap
        assert count(svc, Job) == 5  # the evaluation's own jobs, queued again, no new ones
        assert svc.submit(svc.alice, digit_png(9), **slow).status_code == 429
        queued = client.get("/jobs?status=queued", headers=h).json()["total"]
        running = client.get("/jobs?status=running", headers=h).json()["total"]
        assert queued + running == 2

        # An evaluation not cancelled whose images were cancelled one by one: re-submitting one
        # puts the evaluation back in progress, so a second evaluation in progress is refused.
        for job in client.get("/jobs?limit=100", headers=h).json()["items"]:
            client.delete(job["url"], headers=h)
        other = zipped({f"digit-{i}/{i}.png": digit_png(i + 10) for i in range(2)})
        second = evaluate(svc, svc.alice, files={"archive": ("b.zip", other)}, **slow)
        assert second.status_code == 202, second.text
        for job in client.get("/jobs?status=queued", headers=h).json()["items"]:
            client.delete(job["url"], headers=h)
        for job in client.get("/jobs?status=running", headers=h).json()["items"]:
            client.delete(job["url"], headers=h)
        third = evaluate(svc, svc.alice, files={"archive": ("c.zip", archive)}, **slow)
        assert third.status_code == 202, third.text  # the second is no longer in progress
        again = svc.submit(svc.alice, digit_png(10), **slow)  # the second's first image
        assert again.status_code == 429 and "too many evaluations" in again.text, again.text
        for job in client.get("/jobs?limit=100", headers=h).json()["items"]:
            client.delete(job["url"], headers=h)


def test_two_cancels_of_evaluations_sharing_jobs_cancel_the_shared_ones(
    pg_url: str,  # noqa: F811
    tmp_path: Path,
    tiny_checkpoint: Path,  # noqa: F811
) -> None:
    """Found by a breaker: two evaluations of the same images, cancelled at once, each took the
    other for one in progress and left the shared jobs queued, counted by no cap. The second
    cancel now waits for the first (the key's lock) and then sees it: nothing is left queued."""
    import shutil
    import threading

    from service_support import reset_postgres

    from domain import registry
    from domain.keys import Caller, create_key
    from domain.services import evaluations
    from domain.services.submissions import Params
    from domain.store import migrate, state
    from domain.store.db import get_database
    from domain.store.tables import ACTIVE_STATUSES, Evaluation

    reset_postgres(pg_url)
    migrate.upgrade(pg_url)
    settings = service_settings(tmp_path / "data", database_url=pg_url)
    db = get_database(pg_url)
    shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors")
    request = evaluations.Request(
        Params(sigma=0.25, n0=20, n=200), dataset="digits:test", max_images=2
    )
    with db.session() as s:
        registry.register(
            s, location=str(tmp_path / "tiny.safetensors"), name="tiny-s0.25", default=True
        )
        key, _ = create_key(s, "canceller")
        s.commit()
        caller = Caller(key.id, False)
        ids = [evaluations.submit(s, caller, request, settings)[0].id for _ in range(2)]
    entered, release = threading.Event(), threading.Event()
    original = state.cancel_many

    def held(session: Any, job_ids: list[str]) -> list[str]:
        if threading.current_thread().name == "first":  # holds its locks until released
            entered.set()
            release.wait(30)
        return original(session, job_ids)

    def cancel(evaluation_id: str) -> None:
        with db.session() as s:
            evaluations.cancel(s, s.get_one(Evaluation, evaluation_id))

    state.cancel_many = held
    try:
        first = threading.Thread(target=cancel, args=(ids[0],), name="first")
        first.start()
        assert entered.wait(30)
        second = threading.Thread(target=cancel, args=(ids[1],), name="second")
        second.start()
        second.join(1.0)
        waited = second.is_alive()  # for the first's lock on the key
        release.set()
        first.join(30)
        second.join(30)
    finally:
        state.cancel_many = original
    with db.session() as s:
        jobs = s.scalars(select(Job.status).where(Job.owner_id == caller.id)).all()
    assert len(jobs) == 2 and not set(jobs) & set(ACTIVE_STATUSES), jobs
    assert waited
