"""Unpacking an uploaded ImageFolder archive (zip, tar, tar.gz/.bz2/.xz) without trusting it.

The archive comes from a client, so before anything is believed:

- its size is capped (``max_archive_bytes``), and so is its number of entries
  (``max_archive_members``): for a zip from the count its end record declares, before the
  central directory is parsed (a million tiny entries would otherwise fill memory first);
- the bytes it expands to are counted while they are read (``max_archive_expanded_bytes``;
  for a compressed tar the whole decompressed stream, headers included), so a compression bomb
  stops at the cap; each image is also capped by ``max_upload_bytes``, like an upload;
- a member whose path is absolute (``/x``, ``C:\\x``), climbs out of its folder (``..``) or
  holds a NUL, a link (symbolic or hard), a device, a FIFO, or an encrypted zip entry, refuses
  the whole archive;
- member names are never used as file names: each image is copied to ``dest/<number>`` (a
  folder the caller chose and removes), so nothing can be written anywhere else.

Layout: one folder per class with the images directly inside (``3/a.png``), optionally all
under one top folder (``test/3/a.png``, what zipping a folder gives). Every member is sorted by
the rule the CLI applies to a folder (``models.data.sort_members``): hidden and system files
(``.DS_Store``, ``._x``, ``__MACOSX/``, ``Thumbs.db``) are left out; a file that is not an
upload's image by its suffix (``domain.intake.images.IMAGE_SUFFIXES``: ``.avif``, ``.heic``,
``.gif``,
``notes.txt``) or lies outside the layout refuses the archive, naming it, unless the caller
collects such members (``skipped``): then they are reported, never dropped without a word. The
images themselves are checked later, exactly as uploads are (``domain.intake.images.decode_image``).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from domain.errors import ServiceError
from domain.intake.images import IMAGE_SUFFIXES
from models.data import Skipped, format_problem, is_ignored, refusal, sort_members

CHUNK = 1 << 20
SKIP_INVALID = "send skip_invalid=true"


@dataclass(frozen=True)
class Limits:
    """The caps an archive is held to (bytes, entries)."""

    archive_bytes: int
    members: int
    expanded_bytes: int
    member_bytes: int  # one image


@dataclass(frozen=True)
class Member:
    """One image of the archive: its class folder, its name as shown (``folder/file``) and the
    server-named file its bytes were copied to."""

    folder: str
    name: str
    path: Path


def refuse(detail: str, status: int = 422) -> ServiceError:
    return ServiceError(status, f"archive refused: {detail}")


def member_parts(name: str) -> list[str]:
    """The path components of a member name; refuses absolute paths, ``..`` and NULs."""
    if "\x00" in name:
        raise refuse(f"member {name!r} has a NUL character in its name")
    path = name.replace("\\", "/")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise refuse(f"member {name!r} has an absolute path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise refuse(f"member {name!r} escapes its folder ('..' in its path)")
    return parts


def _wanted(parts: list[str], found: list[Any]) -> bool:
    """An image by its name (copied then); a file that is no image by its name is noted in
    ``found`` (with no copy) for :func:`_layout` to report; hidden and system files: neither."""
    if is_ignored(parts):
        return False
    if format_problem(parts[-1], IMAGE_SUFFIXES) is not None:
        found.append((parts, None, "/".join(parts)))
        return False
    return True


class _Budget:
    """Counts expanded bytes against the cap; 413 the moment it is exceeded."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.used = 0

    def spend(self, count: int) -> None:
        self.used += count
        if self.used > self.limits.expanded_bytes:
            raise refuse(
                f"it expands to more than the limit of {self.limits.expanded_bytes} bytes", 413
            )


class _CappedReader:
    """A file-like ``read`` over a decompressed stream that stops at the budget's cap."""

    def __init__(self, raw: Any, budget: _Budget):
        self.raw = raw
        self.budget = budget

    def read(self, size: int = -1) -> bytes:
        room = self.budget.limits.expanded_bytes + 1 - self.budget.used
        data: bytes = self.raw.read(room if size is None or size < 0 else min(size, room))
        self.budget.spend(len(data))
        return data


def _copy(src: IO[bytes], dest: Path, name: str, limits: Limits, budget: _Budget | None) -> None:
    """Copy one member to ``dest``: at most ``member_bytes`` (413 beyond), its bytes spent from
    ``budget`` (None: the stream they come from counts them already)."""
    size = 0
    with open(dest, "xb") as out:
        # Never more than member_bytes + 1 bytes: enough to tell that a member is too large.
        while chunk := src.read(min(CHUNK, limits.member_bytes + 1 - size)):
            size += len(chunk)
            if size > limits.member_bytes:
                raise refuse(
                    f"member {name!r} is larger than the limit of {limits.member_bytes} bytes "
                    "for one image",
                    413,
                )
            if budget is not None:
                budget.spend(len(chunk))
            out.write(chunk)


def _kind(head: bytes, tar_magic: bytes) -> str:
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "gz"
    if head.startswith(b"BZh"):
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if tar_magic.startswith(b"ustar"):
        return "tar"
    raise ServiceError(415, "not a zip or tar archive (tar, tar.gz, tar.bz2, tar.xz)")


def unpack(
    fileobj: IO[bytes], dest: Path, limits: Limits, skipped: list[Skipped] | None = None
) -> list[Member]:
    """The images of the ImageFolder archive ``fileobj`` (seekable), copied into the new folder
    ``dest``; sorted by class folder, then file name (the order of
    ``models.data.ImageFolderDataset``). ServiceError 413 (a cap), 415 (not an archive) or 422
    (an unsafe member, a damaged archive, no images, or a member that is not an image by its
    name or lies outside the layout), with a sentence naming the member. With ``skipped`` (a
    list), members of the last two kinds are appended to it, with their reasons, instead."""
    fileobj.seek(0, 2)
    size = fileobj.tell()
    if size > limits.archive_bytes:
        raise refuse(f"larger than the limit of {limits.archive_bytes} bytes", 413)
    if size == 0:
        raise refuse("the upload is empty")
    fileobj.seek(0)
    head = fileobj.read(8)
    fileobj.seek(257)
    tar_magic = fileobj.read(8)
    fileobj.seek(0)
    kind = _kind(head, tar_magic)
    dest.mkdir(parents=True, exist_ok=False)
    budget = _Budget(limits)
    found = (
        _unzip(fileobj, dest, limits, budget)
        if kind == "zip"
        else (_untar(fileobj, kind, dest, limits, budget))
    )
    return _layout(found, skipped)


def _unzip(fileobj: IO[bytes], dest: Path, limits: Limits, budget: _Budget) -> list[Any]:
    # The entry count of the end record zipfile will use, read before zipfile parses the index.
    end = zipfile._EndRecData(fileobj)  # type: ignore[attr-defined]
    if end is None:
        raise refuse("not a readable zip archive (no end of central directory)")
    if end[zipfile._ECD_ENTRIES_TOTAL] > limits.members:  # type: ignore[attr-defined]
        raise refuse(f"more than {limits.members} entries", 413)
    try:
        archive = zipfile.ZipFile(fileobj)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as exc:
        raise refuse(f"not a readable zip archive ({exc})") from exc
    found: list[Any] = []
    with archive:
        infos = archive.infolist()
        if len(infos) > limits.members:
            raise refuse(f"more than {limits.members} entries", 413)
        for info in infos:
            parts = member_parts(info.filename)
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if stat.S_ISLNK(mode):
                raise refuse(f"member {info.filename!r} is a symbolic link")
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise refuse(f"member {info.filename!r} is not a regular file or folder")
            if info.is_dir() or not _wanted(parts, found):
                continue
            if info.flag_bits & 0x1:
                raise refuse(f"member {info.filename!r} is encrypted")
            if info.file_size > limits.member_bytes:
                raise refuse(
                    f"member {info.filename!r} is larger than the limit of "
                    f"{limits.member_bytes} bytes for one image",
                    413,
                )
            if budget.used + info.file_size > limits.expanded_bytes:
                budget.spend(info.file_size)  # raises: the declared sizes already exceed it
            target = dest / f"{len(found):06d}"
            try:
                with archive.open(info) as src:
                    _copy(src, target, info.filename, limits, budget)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError,
                    RuntimeError) as exc:  # fmt: skip
                raise refuse(f"member {info.filename!r} cannot be read ({exc})") from exc
            found.append((parts, target, info.filename))
    return found


def _decompressed(fileobj: IO[bytes], kind: str) -> Any:
    """The tar stream inside ``fileobj``, decompressed lazily (read through a capped reader)."""
    if kind == "gz":
        return gzip.GzipFile(fileobj=fileobj, mode="rb")
    if kind == "bz2":
        return bz2.BZ2File(fileobj, mode="rb")
    if kind == "xz":
        return lzma.LZMAFile(fileobj, mode="rb")
    return fileobj


# A pax header or GNU long name is read whole into memory by tarfile before its member is seen;
# real ones hold a path and a few attributes.
MAX_TAR_METADATA_BYTES = 1 << 20
METADATA_TYPES = (
    tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
)  # fmt: skip


class _CappedTarInfo(tarfile.TarInfo):
    """Refuses (413) a metadata record over :data:`MAX_TAR_METADATA_BYTES` before it is read."""

    def _proc_member(self, tarfile: tarfile.TarFile) -> Any:
        if self.type in METADATA_TYPES and self.size > MAX_TAR_METADATA_BYTES:
            raise refuse(
                f"a metadata record (pax header or long name) of {self.size} bytes exceeds the "
                f"limit of {MAX_TAR_METADATA_BYTES} bytes",
                413,
            )
        return super()._proc_member(tarfile)  # type: ignore[misc]


def _untar(fileobj: IO[bytes], kind: str, dest: Path, limits: Limits, budget: _Budget) -> list[Any]:
    stream = _CappedReader(_decompressed(fileobj, kind), budget)
    found: list[Any] = []
    count = 0
    try:
        # Stream mode: one pass, never seeking, every byte through the capped reader.
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_CappedTarInfo) as archive:  # type: ignore[call-overload]
            for member in archive:
                count += 1
                if count > limits.members:
                    raise refuse(f"more than {limits.members} entries", 413)
                parts = member_parts(member.name)
                if member.issym() or member.islnk():
                    raise refuse(f"member {member.name!r} is a link")
                if not (member.isreg() or member.isdir()):
                    raise refuse(f"member {member.name!r} is not a regular file or folder")
                if member.isdir() or not _wanted(parts, found):
                    continue
                if member.size > limits.member_bytes:
                    raise refuse(
                        f"member {member.name!r} is larger than the limit of "
                        f"{limits.member_bytes} bytes for one image",
                        413,
                    )
                src = archive.extractfile(member)
                if src is None:
                    raise refuse(f"member {member.name!r} has no data")
                target = dest / f"{len(found):06d}"
                _copy(src, target, member.name, limits, None)
                found.append((parts, target, member.name))
    except ServiceError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError) as exc:
        raise refuse(f"not a readable tar archive ({exc})") from exc
    return found


def _layout(found: list[Any], skipped: list[Skipped] | None) -> list[Member]:
    """Class folder and name of each image (``models.data.sort_members``'s ``archive`` layout:
    ``class/file``, or ``top/class/file`` with one common top folder). A member that is no
    image, or outside the layout, refuses the archive unless ``skipped`` collects it; so does
    a name that occurs twice, always."""
    copies = {tuple(parts): path for parts, path, _ in found if path is not None}
    raw = {tuple(parts): name for parts, path, name in found if path is not None}
    sorted_ = sort_members([tuple(parts) for parts, _, _ in found], IMAGE_SUFFIXES, "archive")
    if sorted_.skipped:
        if skipped is None:
            raise refuse(refusal(sorted_.skipped, SKIP_INVALID))
        skipped.extend(sorted_.skipped)
    if not sorted_.images:
        raise refuse(
            "it holds no images (PNG, JPEG or WebP files in one folder per class, e.g. 3/a.png)"
        )
    members = []
    seen: set[str] = set()
    for parts, folder, name in sorted_.images:
        if name in seen:
            raise refuse(f"member {raw[parts]!r} occurs twice")
        seen.add(name)
        members.append(Member(folder, name, copies[parts]))
    return sorted(members, key=lambda m: (m.folder, m.name.split("/", 1)[1]))
