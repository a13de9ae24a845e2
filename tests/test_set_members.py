"""Issue 26 item 2: files of a test set that are not supported images never vanish.

The failing input: an ImageFolder with ``0/a.png``, ``0/b.avif``, ``0/c.heic``, ``0/d.jxl``
(the same for classes 1 and 2). ``certify --input DIR`` reported 3 inputs, ``submit --input
DIR`` "3 of 3 image(s) certified" and ``POST /evaluations`` ``images_total: 3``: nine files
dropped without a word. The rule now (``models.data.sort_members``, on all three paths): such a
file refuses the whole set, naming it and why; with ``--skip-invalid`` / ``skip_invalid=true``
it is skipped and listed (stderr, the TSV's ``# skipped`` footer, the evaluation's
``skipped``). Hidden and system files are left out without a word.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from PIL import Image
from service_support import (  # noqa: F401 - fixtures
    OLD_KEY_AND_MODEL,
    database,
    digit_png,
    pg_url,
    tiny_checkpoint,
)
from test_cli_submit import SMALL as SUBMIT_SMALL
from test_cli_submit import Server, server, submit  # noqa: F401 - server is a fixture
from test_evaluations import SMALL, evaluate, finished, service, zipped  # noqa: F401
from test_service_embedded import Service

from cli import main
from cli.submit import zip_folder
from domain.store import migrate
from domain.store.db import make_engine
from models.data import IMAGE_SUFFIXES, Skipped, folder_members, open_inputs, sort_members
from models.evaluate import read_tsv

FAST = ["--n0", "20", "--n", "200", "--alpha", "0.001", "--no-progress"]
OTHER = ("b.avif", "c.heic", "d.jxl")  # formats no path supports
AVIF = b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf"  # an AVIF's opening bytes


def gif(index: int) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(digit_png(index))).save(out, "GIF")
    return out.getvalue()


def issue_set(prefix: str = "") -> dict[str, bytes]:
    """The issue's failing input: per class a PNG and an AVIF, HEIC and JPEG XL file."""
    members = {}
    for i, cls in enumerate(("0", "1", "2")):
        members[f"{prefix}{cls}/a.png"] = digit_png(i)
        for name in OTHER:
            members[f"{prefix}{cls}/{name}"] = AVIF
    return members


def write(root: Path, members: dict[str, bytes]) -> Path:
    for name, data in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def the_nine(prefix: str = "") -> list[str]:
    return [f"{prefix}{cls}/{name}" for cls in ("0", "1", "2") for name in OTHER]


# ---------------------------------------------------------------- the one rule


def test_the_rule_sorts_every_member() -> None:
    paths = [
        ("0", "a.png"), ("0", "b.avif"), ("0", "README"), ("0", ".DS_Store"), ("0", "._a.png"),
        ("__MACOSX", "0", "._a.png"), ("0", "Thumbs.db"), ("1", "desktop.ini"),
        (".git", "config"), ("0", "sub", "x.png"), ("x.png",), ("notes.txt",), ("1", "g.GIF"),
    ]  # fmt: skip
    found = sort_members(paths, (".png",), "classes")
    assert found.images == [(("0", "a.png"), "0", "0/a.png")]
    reasons = {s.name: s.reason for s in found.skipped}
    assert set(reasons) == {"0/b.avif", "0/README", "0/sub/x.png", "x.png", "notes.txt", "1/g.GIF"}
    assert reasons["0/b.avif"].startswith("'.avif' is not a supported image format")
    assert reasons["0/README"].startswith("no file suffix")
    assert reasons["0/sub/x.png"].startswith("not in a class folder")
    assert reasons["x.png"].startswith("not in a class folder")
    # An archive may hold everything under one top folder (what zipping a folder gives).
    top = sort_members([("t", "0", "a.png"), ("t", "b.png")], (".png",), "archive")
    assert top.images == [(("t", "0", "a.png"), "0", "0/a.png")]
    assert top.skipped == [Skipped("t/b.png", top.skipped[0].reason)]
    assert "not in a class folder" in top.skipped[0].reason
    flat = sort_members([("a.png",), ("d", "b.png")], (".png",), "flat")
    assert [n for _, _, n in flat.images] == ["a.png"]
    assert flat.skipped[0].name == "d/b.png" and "sub-folder" in flat.skipped[0].reason


def test_a_folder_lists_every_file_but_hidden_ones(tmp_path: Path) -> None:
    write(tmp_path, {"0/a.png": b"x", "0/.DS_Store": b"x", ".hidden/b.png": b"x",
                     "0/deep/er/c.png": b"x", "r.txt": b"x"})  # fmt: skip
    assert folder_members(tmp_path) == [("0", "a.png"), ("0", "deep", "er", "c.png"),
                                        ("r.txt",)]  # fmt: skip
    found = sort_members(folder_members(tmp_path), IMAGE_SUFFIXES, "classes")
    assert [s.name for s in found.skipped] == ["0/deep/er/c.png", "r.txt"]


# ---------------------------------------------------------------- CLI certify


def test_cli_certify_refuses_the_issues_set_naming_the_nine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write(tmp_path / "set", issue_set())
    out = tmp_path / "r.tsv"
    code = main(["certify", "--input", str(root), *FAST, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1, captured
    assert "9 file(s) of the set are not supported images" in captured.err
    for name in the_nine():
        assert f"'{name}': '.{name.rsplit('.', 1)[1]}' is not a supported image" in captured.err
    assert "--skip-invalid" in captured.err and "Traceback" not in captured.err
    assert captured.out == "" and not out.exists()


def test_cli_certify_skip_invalid_lists_the_nine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write(tmp_path / "set", issue_set())
    out = tmp_path / "r.tsv"
    code = main(["certify", "--input", str(root), *FAST, "--out", str(out), "--skip-invalid"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [r.name for r in read_tsv(out)] == ["0/a.png", "1/a.png", "2/a.png"]
    footer = [ln for ln in out.read_text().splitlines() if ln.startswith("#")]
    assert [ln.split("\t")[1] for ln in footer] == the_nine()
    assert all(ln.startswith("# skipped\t") and "is not a supported image" in ln for ln in footer)
    for name in the_nine():
        assert f"warning: skipped {name}: " in captured.err
    assert "9 file(s) skipped" in captured.out


@pytest.mark.parametrize(
    ("member", "data", "reason"),
    [
        ("0/e.png", b"", "not a readable image"),  # empty
        ("0/t.png", b"this is not an image\n", "not a readable image"),  # misnamed text
        ("0/cut.png", "TRUNCATED", "unreadable or corrupt PNG image"),
        ("0/m.heic", AVIF, "'.heic' is not a supported image format"),
        ("0/sub/x.png", "PNG", "not in a class folder"),  # nested folder
        ("x.png", "PNG", "not in a class folder"),  # at the ImageFolder's root
        ("notes.txt", b"x", "'.txt' is not a supported image format"),
    ],
)
def test_cli_relatives_refuse_or_are_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], member: str, data: Any, reason: str
) -> None:
    png = digit_png(3)
    data = {"PNG": png, "TRUNCATED": png[: len(png) // 2]}.get(data, data)
    root = write(tmp_path / "set", {"0/a.png": digit_png(0), "1/a.png": digit_png(1),
                                    member: data})  # fmt: skip
    assert main(["predict", "--input", str(root), "--n", "200", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"'{member}': {reason}" in err, err
    out = tmp_path / "r.tsv"
    assert main(["predict", "--input", str(root), "--n", "200", "--no-progress",
                 "--skip-invalid", "--out", str(out)]) == 0  # fmt: skip
    assert f"warning: skipped {member}: {reason}" in capsys.readouterr().err
    assert [r.name for r in read_tsv(out)] == ["0/a.png", "1/a.png"]


def test_cli_hidden_files_and_a_gif_are_no_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI reads GIF (IMAGE_SUFFIXES); hidden and system files are no part of the set."""
    root = write(tmp_path / "set", {"0/a.png": digit_png(0), "1/b.gif": gif(1),
                                    "0/.DS_Store": b"x", "0/._a.png": b"x", "1/Thumbs.db": b"x",
                                    "__MACOSX/0/._a.png": b"x", ".git/HEAD": b"x"})  # fmt: skip
    out = tmp_path / "r.tsv"
    assert main(["predict", "--input", str(root), "--n", "200", "--no-progress",
                 "--out", str(out)]) == 0  # fmt: skip
    assert [r.name for r in read_tsv(out)] == ["0/a.png", "1/b.gif"]
    assert "skipped" not in capsys.readouterr().err


# ---------------------------------------------------------------- POST /evaluations


def digit_classes(members: dict[str, bytes]) -> dict[str, bytes]:
    """The tiny test model's classes are digit-0 ... digit-9."""
    return {name.replace("/0/", "/digit-0/").replace("/1/", "/digit-1/")
            .replace("/2/", "/digit-2/"): data for name, data in members.items()}  # fmt: skip


def test_api_refuses_the_issues_archive_naming_the_nine(service: Service) -> None:
    archive = zipped(digit_classes(issue_set("set/")))
    r = evaluate(service, service.alice, files={"archive": ("set.zip", archive)}, **SMALL)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "9 file(s) of the set are not supported images" in detail
    for name in the_nine("set/"):
        assert name.replace("set/", "set/digit-") in detail
    assert "skip_invalid=true" in detail


def test_api_skip_invalid_lists_the_nine(service: Service) -> None:
    archive = zipped({**digit_classes(issue_set("set/")), "set/.DS_Store": b"x",
                      "__MACOSX/set/._x": b"x"})  # fmt: skip
    r = evaluate(service, service.alice, files={"archive": ("set.zip", archive)},
                 skip_invalid="true", **SMALL)  # fmt: skip
    assert r.status_code == 202, r.text
    ev = finished(service, service.alice, r.json()["url"])
    assert ev["progress"]["images_total"] == 3 and ev["status"] == "succeeded"
    nine = [n.replace("set/", "set/digit-") for n in the_nine("set/")]
    assert [s["name"] for s in ev["skipped"]] == nine
    assert all("is not a supported image format" in s["reason"] for s in ev["skipped"])
    tsv = service.client.get(ev["results_url"], headers=service.h(service.alice)).text
    footer = [ln.split("\t") for ln in tsv.splitlines() if ln.startswith("#")]
    assert [f[1] for f in footer] == nine and {f[0] for f in footer} == {"# skipped"}


def test_api_relatives(service: Service) -> None:
    """A GIF (refused by suffix), a GIF named .png and an empty .png (refused by their bytes,
    as POST /certify refuses them), files at the root and in deeper folders: each refuses the
    set naming it, or is skipped with its reason. A member climbing out of its folder refuses
    the archive even with skip_invalid."""
    good = {"digit-0/a.png": digit_png(0), "digit-1/a.png": digit_png(1)}
    cases = [
        ("digit-1/g.gif", gif(1), 422, "'.gif' is not a supported image format"),
        ("digit-1/g.png", gif(1), 415, "not a supported image"),
        ("digit-1/e.png", b"", 422, "the image upload is empty"),
        ("digit-1/deep/x.png", digit_png(2), 422, "not in a class folder"),
        ("x.png", digit_png(2), 422, "not in a class folder"),
    ]
    for member, data, status, reason in cases:
        archive = zipped({**good, member: data})
        r = evaluate(service, service.alice, files={"archive": ("x.zip", archive)}, **SMALL)
        assert r.status_code == status and member in r.json()["detail"], (member, r.text)
        assert reason in r.json()["detail"], (member, r.text)
        r = evaluate(service, service.alice, files={"archive": ("x.zip", archive)},
                     skip_invalid="true", **SMALL)  # fmt: skip
        assert r.status_code == 202, (member, r.text)
        ev = finished(service, service.alice, r.json()["url"])  # the cap: 2 in progress
        assert ev["progress"]["images_total"] == 2 and ev["status"] == "succeeded"
        [skipped] = ev["skipped"]
        assert skipped["name"] == member and reason in skipped["reason"], skipped
    escaping = zipped({**good, "digit-0/../../e.png": digit_png(0)})
    r = evaluate(service, service.alice, files={"archive": ("x.zip", escaping)},
                 skip_invalid="true", **SMALL)  # fmt: skip
    assert r.status_code == 422 and "escapes its folder" in r.json()["detail"], r.text
    only_bad = zipped({"digit-0/a.png": b"", "digit-0/b.avif": AVIF})
    r = evaluate(service, service.alice, files={"archive": ("x.zip", only_bad)},
                 skip_invalid="true", **SMALL)  # fmt: skip
    assert r.status_code == 422 and "no image could be certified" in r.json()["detail"], r.text


def test_api_server_dataset_follows_the_rule(service: Service) -> None:
    root = Path(service.app.state.settings.datasets) / "mine"
    write(root, {"digit-0/a.png": digit_png(0), "digit-1/a.png": digit_png(1),
                 "digit-1/b.heic": AVIF, "digit-1/.DS_Store": b"x"})  # fmt: skip
    r = evaluate(service, service.alice, dataset="mine", **SMALL)
    assert r.status_code == 422 and "'digit-1/b.heic'" in r.json()["detail"], r.text
    assert "skip_invalid=true" in r.json()["detail"] and str(root) not in r.text
    r = evaluate(service, service.alice, dataset="mine", skip_invalid="true", **SMALL)
    assert r.status_code == 202, r.text
    assert [s["name"] for s in r.json()["skipped"]] == ["digit-1/b.heic"]
    assert r.json()["progress"]["images_total"] == 2


def no_files(root: Path, prefix: str = "") -> list[str]:
    """Entries that are no files: a dangling link, a looping link and a FIFO, named as images
    (reading the FIFO would wait forever); with a good class folder beside them."""
    write(root, {f"{prefix}0/a.png": digit_png(0), f"{prefix}1/a.png": digit_png(1)})
    (root / f"{prefix}1" / "gone.png").symlink_to(root / "nowhere.png")
    (root / f"{prefix}1" / "loop.png").symlink_to(root / f"{prefix}1" / "loop.png")
    os.mkfifo(root / f"{prefix}1" / "pipe.png")
    return [f"{prefix}1/{name}" for name in ("gone.png", "loop.png", "pipe.png")]


def test_entries_that_are_no_files_never_vanish(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "set"
    odd = no_files(root)
    assert main(["predict", "--input", str(root), "--n", "200", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "3 file(s) of the set are not supported images" in err, err
    assert f"'{odd[0]}': a symbolic link to nothing" in err
    assert f"'{odd[1]}': a symbolic link to nothing" in err
    assert f"'{odd[2]}': not a regular file" in err
    out = tmp_path / "r.tsv"
    assert main(["predict", "--input", str(root), "--n", "200", "--no-progress",
                 "--skip-invalid", "--out", str(out)]) == 0  # fmt: skip
    assert capsys.readouterr().err.count("warning: skipped 1/") == 3
    assert [r.name for r in read_tsv(out)] == ["0/a.png", "1/a.png"]
    footer = [ln.split("\t")[1] for ln in out.read_text().splitlines() if ln.startswith("#")]
    assert footer == odd
    # a flat folder, and the zip that submit builds (no archive can carry such an entry)
    assert [s.name for s in open_inputs(str(root / "1"), 8, None, True).skipped] == [
        n.split("/")[1] for n in odd
    ]
    with pytest.raises(ValueError, match="3 file.s. of the set are not supported images"):
        zip_folder(root, io.BytesIO())
    assert zip_folder(root, io.BytesIO(), skip_invalid=True) == 2
    assert capsys.readouterr().err.count("warning: skipped 1/") == 3


def test_api_server_dataset_names_entries_that_are_no_files(service: Service) -> None:
    root = Path(service.app.state.settings.datasets) / "odd"
    odd = no_files(root, "digit-")
    r = evaluate(service, service.alice, dataset="odd", **SMALL)
    assert r.status_code == 422 and all(f"'{n}'" in r.json()["detail"] for n in odd), r.text
    assert str(root) not in r.text
    r = evaluate(service, service.alice, dataset="odd", skip_invalid="true", **SMALL)
    assert r.status_code == 202, r.text
    assert [s["name"] for s in r.json()["skipped"]] == odd
    assert r.json()["progress"]["images_total"] == 2


# ---------------------------------------------------------------- CLI submit


def test_submit_refuses_or_skips_the_issues_folder(
    server: Server,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    members = digit_classes(issue_set("/"))
    members = {n.removeprefix("/"): d for n, d in members.items()}
    root = write(tmp_path / "set", {**members, "digit-0/.DS_Store": b"x"})
    assert submit(server, "--input", str(root), *SUBMIT_SMALL) == 1
    err = capsys.readouterr().err
    assert "HTTP 422" in err and "9 file(s) of the set are not supported images" in err
    assert "'set/digit-0/b.avif'" in err and ".DS_Store" not in err
    tsv = tmp_path / "r.tsv"
    assert submit(server, "--input", str(root), *SUBMIT_SMALL, "--skip-invalid",
                  "--out", str(tsv)) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert "3 of 3 image(s) certified" in captured.out
    assert "; 9 file(s) skipped (not supported images, listed on stderr)" in captured.out
    assert captured.err.count("warning: skipped set/digit-") == 9
    assert len(read_tsv(tsv)) == 3
    assert sum(ln.startswith("# skipped\t") for ln in tsv.read_text().splitlines()) == 9


# ---------------------------------------------------------------- migration


def test_migration_0010_keeps_evaluations(database: str) -> None:  # noqa: F811
    migrate.upgrade(database, "0009")
    engine = make_engine(database)
    with engine.begin() as conn:
        for statement in OLD_KEY_AND_MODEL:
            conn.execute(sa.text(statement))
        conn.execute(sa.text(
            "INSERT INTO evaluations (id, owner_id, source, mode, checkpoint_id, model_name, "
            "classes, sigma, alpha, n0, n, skip, total, created_at) VALUES ('e', 1, "
            "'digits:test', 'certify', 1, 'm', '[]', 0.25, 0.001, 100, 1000, 1, 1, "
            "CURRENT_TIMESTAMP)"
        ))  # fmt: skip
    migrate.upgrade(database)
    table = sa.table("evaluations", sa.column("id"), sa.column("skipped", sa.JSON))
    with engine.connect() as conn:
        assert conn.execute(sa.select(table.c.id, table.c.skipped)).all() == [("e", [])]
    migrate.downgrade(database, "0009")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT id, total FROM evaluations")).all() == [("e", 1)]
    engine.dispose()
