"""Uploaded evaluation archives are untrusted (domain/intake/archives.py): every unsafe member kind
refuses the whole archive with a 4xx and a sentence, caps hold while reading (bombs stop at
the cap), nothing is ever written outside the folder the caller chose, and a good ImageFolder
comes out in the order ``models.data.ImageFolderDataset`` gives the same folder on disk."""

from __future__ import annotations

import gzip
import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from service_support import digit_png

from domain.errors import ServiceError
from domain.intake import archives
from models.data import ImageFolderDataset, Skipped

LIMITS = archives.Limits(
    archive_bytes=10 << 20, members=100, expanded_bytes=4 << 20, member_bytes=1 << 20
)
PNG = digit_png(0)


def make_zip(members: dict[str, bytes]) -> io.BytesIO:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    out.seek(0)
    return out


def make_tar(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> io.BytesIO:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode) as t:  # type: ignore[call-overload]
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                t.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                t.addfile(info, io.BytesIO(m[1]))
    out.seek(0)
    return out


def special(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


def unpack(
    archive: io.BytesIO,
    tmp_path: Path,
    limits: archives.Limits = LIMITS,
    skipped: list[Skipped] | None = None,
) -> list[str]:
    return [m.name for m in archives.unpack(archive, tmp_path / "dest", limits, skipped)]


def refused(archive: io.BytesIO, tmp_path: Path, status: int, words: str, **caps: int) -> None:
    limits = archives.Limits(**{**LIMITS.__dict__, **caps})
    with pytest.raises(ServiceError) as err:
        unpack(archive, tmp_path, limits)
    assert err.value.status_code == status, err.value.detail
    assert words in err.value.detail, err.value.detail
    assert err.value.detail.startswith("archive refused: ")


def everything_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_a_good_archive_comes_out_in_image_folder_order(tmp_path: Path) -> None:
    members = {"7/b.png": PNG, "3/z.png": PNG, "3/a.png": PNG, "10/c.png": PNG}
    got = unpack(make_zip(members), tmp_path)
    disk = tmp_path / "disk"
    for name, data in members.items():
        (disk / name).parent.mkdir(parents=True, exist_ok=True)
        (disk / name).write_bytes(data)
    assert got == [name for _, _, name in ImageFolderDataset(disk, 8).items]
    assert got == ["10/c.png", "3/a.png", "3/z.png", "7/b.png"]
    # Copies carry server-chosen names only.
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == [
        "000000", "000001", "000002", "000003",
    ]  # fmt: skip


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_in_every_compression_with_a_top_folder_and_junk(tmp_path: Path, mode: str) -> None:
    """Hidden and system files are left out without a word; a README is no image: it refuses
    the archive, naming it, or is listed as skipped (issue 26 item 2)."""
    members = [("test/3/a.png", PNG), ("test/7/b.png", PNG), ("test/README.txt", b"hello"),
               ("test/3/.DS_Store", b"x"), ("__MACOSX/test/3/._a.png", b"x"),
               ("test/7/Thumbs.db", b"x")]  # fmt: skip
    refused(make_tar(members, mode), tmp_path / "r", 422, "'test/README.txt': '.txt' is not")
    skipped: list[Skipped] = []
    assert unpack(make_tar(members, mode), tmp_path, skipped=skipped) == ["3/a.png", "7/b.png"]
    assert [s.name for s in skipped] == ["test/README.txt"]


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("../evil.png", "escapes its folder"),
        ("3/../../evil.png", "escapes its folder"),
        ("3\\..\\..\\evil.png", "escapes its folder"),
        ("/tmp/evil.png", "absolute path"),
        ("C:/evil.png", "absolute path"),
        ("C:\\evil.png", "absolute path"),
    ],
)
def test_paths_escaping_their_folder_are_refused_and_nothing_is_written(
    tmp_path: Path, name: str, words: str
) -> None:
    before = everything_under(tmp_path)
    for archive in (
        make_zip({"3/a.png": PNG, name: PNG}),
        make_tar([("3/a.png", PNG), (name, PNG)]),
    ):
        refused(archive, tmp_path, 422, words)
        written = everything_under(tmp_path) - before
        # Only the destination folder and server-named copies in it, never the member's name.
        assert all(w == "dest" or w.startswith("dest/0") for w in written), written
        assert not list(tmp_path.rglob("evil*"))
        for copy in (tmp_path / "dest").iterdir():
            copy.unlink()
        (tmp_path / "dest").rmdir()


def test_links_devices_and_fifos_are_refused(tmp_path: Path) -> None:
    cases = [
        (special("3/a.png", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
        (special("3/a.png", tarfile.LNKTYPE, "3/b.png"), "is a link"),
        (special("3/dev", tarfile.CHRTYPE), "not a regular file"),
        (special("3/blk", tarfile.BLKTYPE), "not a regular file"),
        (special("3/fifo", tarfile.FIFOTYPE), "not a regular file"),
    ]
    for i, (member, words) in enumerate(cases):
        refused(make_tar([member]), tmp_path / str(i), 422, words)
    # A zip entry marked as a Unix symbolic link.
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        info = zipfile.ZipInfo("3/a.png")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd")
    out.seek(0)
    refused(out, tmp_path / "zip", 422, "symbolic link")


def test_member_count_is_capped_before_the_zip_index_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = make_zip({f"3/{i}.png": b"" for i in range(30)})

    def never(*_: object, **__: object) -> None:
        raise AssertionError("the central directory was parsed")

    monkeypatch.setattr(archives.zipfile, "ZipFile", never)
    refused(archive, tmp_path, 413, "more than 10 entries", members=10)
    tar = make_tar([(f"3/{i}.png", b"") for i in range(30)])
    refused(tar, tmp_path / "t", 413, "more than 10 entries", members=10)


def test_a_compression_bomb_stops_at_the_expanded_cap(tmp_path: Path) -> None:
    big = bytes(64 << 20)  # 64 MiB of zeros: ~64 KiB compressed
    tar = make_tar([("3/a.png", big)])
    assert len(tar.getvalue()) < 1 << 20
    refused(tar, tmp_path / "tar", 413, "larger than the limit of 1048576 bytes for one image")
    # Also when the bomb hides in a member the unpacker skips (a non-image file) ...
    skipped = make_tar([("3/notes.txt", big), ("3/a.png", PNG)])
    refused(skipped, tmp_path / "skip", 413, "expands to more than the limit of 4194304 bytes")
    # ... or in a long-name header tarfile would read into memory itself (refused unread).
    header = io.BytesIO()
    info = tarfile.TarInfo("3/" + "x" * (8 << 20) + ".png")
    with tarfile.open(fileobj=header, mode="w", format=tarfile.GNU_FORMAT) as t:
        t.addfile(info, io.BytesIO(b""))
    bomb = io.BytesIO(gzip.compress(header.getvalue()))
    refused(bomb, tmp_path / "long", 413, "a metadata record (pax header or long name)")
    zipped = make_zip({"3/a.png": big})
    refused(zipped, tmp_path / "zip", 413, "larger than the limit of 1048576 bytes for one image")
    many = make_zip({f"3/{i}.png": bytes(900 << 10) for i in range(6)})
    refused(many, tmp_path / "many", 413, "expands to more than the limit of 4194304 bytes")


def test_sizes_layout_and_format(tmp_path: Path) -> None:
    refused(make_zip({"3/a.png": PNG}), tmp_path / "a", 413, "larger than the limit of 100 bytes",
            archive_bytes=100)  # fmt: skip
    refused(io.BytesIO(b""), tmp_path / "b", 422, "empty")
    with pytest.raises(ServiceError) as err:
        unpack(io.BytesIO(PNG), tmp_path / "c")
    assert err.value.status_code == 415 and "not a zip or tar archive" in err.value.detail
    refused(make_zip({"a.png": PNG}), tmp_path / "d", 422, "not in a class folder")
    refused(make_zip({"notes.txt": b"x"}), tmp_path / "f2", 422, "'notes.txt': '.txt' is not")
    refused(make_zip({"3/a.png": PNG, "x/3/b.png": PNG}), tmp_path / "e", 422,
            "not in a class folder")  # fmt: skip
    with pytest.raises(ServiceError, match="holds no images"):
        archives.unpack(make_zip({"notes.txt": b"x"}), tmp_path / "f", LIMITS, [])
    refused(make_zip({"3/a.png": PNG, "3/./a.png": PNG}), tmp_path / "g", 422, "occurs twice")
    refused(io.BytesIO(b"PK\x03\x04" + bytes(100)), tmp_path / "h", 422, "not a readable zip")
    damaged = make_tar([("3/a.png", PNG)]).getvalue()[:200]
    refused(io.BytesIO(damaged), tmp_path / "i", 422, "not a readable tar")


def test_encrypted_zip_entries_are_refused(tmp_path: Path) -> None:
    archive = make_zip({"3/a.png": PNG})
    data = bytearray(archive.getvalue())
    # Set the "encrypted" flag (bit 0) in the local header and the central directory entry.
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):
        at = data.find(sig)
        flag_at = at + (6 if sig == b"PK\x03\x04" else 8)
        data[flag_at] |= 1
    refused(io.BytesIO(bytes(data)), tmp_path, 422, "encrypted")
