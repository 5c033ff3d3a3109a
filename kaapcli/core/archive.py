"""``zip`` / ``unzip``: deterministic archives, and extraction that never escapes its directory.

``zip`` writes entries sorted by name with a fixed timestamp (1980-01-01, the earliest a zip can
hold), fixed permissions (0644, or 0755 for executables) and no extra fields, so the same tree gives
the same bytes.  ``unzip`` checks every entry before extracting anything: absolute names, ``..``
components, drive letters and symlink entries are refused (zip-slip).  Each file is extracted
through a temporary name and the archive's files are renamed into place together, once every
CRC-32 checked out: a damaged archive extracts nothing.  Names that are not UTF-8 are stored
and extracted as the bytes they are (as Info-ZIP does on Unix).
"""

from __future__ import annotations

import errno
import fnmatch
import os
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kaapcli.core import fsio
from kaapcli.core.batch import BaseOperator, Context, Item, Outcome
from kaapcli.exitcodes import DataError, NoInputError, UsageError

FIXED_TIME = (1980, 1, 1, 0, 0, 0)
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or the end record of an empty archive
COPY_BLOCK = 1 << 20


@dataclass
class ZipResult:
    entries: int
    nbytes: int


def split_patterns(values: list[str] | None) -> list[str]:
    """``--include '*.dcm,*.json' --include x`` → ``['*.dcm', '*.json', 'x']``."""
    return [p.strip() for value in values or [] for p in value.split(",") if p.strip()]


def selected(name: str, include: list[str], exclude: list[str]) -> bool:
    """Patterns match the entry name or its last component (``*.dcm`` works at any depth)."""

    def hit(patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit("/", 1)[-1], p)
                   for p in patterns)

    return (not include or hit(include)) and not hit(exclude)


@dataclass
class Plan:
    entries: dict[str, Path]  # entry name -> file, sorted by name
    skipped: list[fsio.Unusable]  # non-regular files met while walking (FIFOs, sockets, broken symlinks, ...)


def plan_entries(inputs: list[Path], dest: Path, include: list[str], exclude: list[str]) -> Plan:
    """Entry name -> file: directory contents relative to the directory, files by their name.

    Only regular files are stored.  A named input that is missing or not a regular file or directory, and a
    directory that cannot be read, stop the archive before it is written (NoInputError naming it): an archive
    silently missing a folder is worse than none.  Names are kept as the bytes the file system has.
    """
    fsio.check_named(str(p) for p in inputs)
    entries: dict[str, Path] = {}
    skipped: list[fsio.Unusable] = []
    target = os.path.realpath(dest)
    for root in inputs:
        for found in fsio.iter_inputs([str(root)]):
            if isinstance(found, fsio.Unusable):
                if found.failed:
                    raise NoInputError(f"{found.path}: {found.reason}", hint="nothing was written")
                skipped.append(found)
                continue
            if not isinstance(found, fsio.InputFile):
                continue
            path = found.path
            name = path.relative_to(found.root).as_posix() if found.root is not None else path.name
            if os.path.realpath(path) == target or not selected(name, include, exclude):
                continue
            if name in entries and entries[name] != path:
                raise UsageError(f"{entries[name]} and {path} would both be stored as {name!r}",
                                 hint="zip one directory, or files with different names")
            entries[name] = path
    return Plan(dict(sorted(entries.items())), skipped)


class _EntryInfo(zipfile.ZipInfo):
    """An entry whose name is not UTF-8 keeps the file system's bytes, without the UTF-8 flag (APPNOTE 4.4.4,
    bit 11), as Info-ZIP's zip does on Unix: zipfile itself cannot encode such a name."""

    __slots__ = ()

    def _encodeFilenameFlags(self) -> tuple[bytes, int]:  # noqa: N802 - zipfile's name
        try:
            return self.filename.encode("ascii"), self.flag_bits
        except UnicodeEncodeError:
            pass
        try:
            return self.filename.encode("utf-8"), self.flag_bits | 0x800
        except UnicodeEncodeError:
            return os.fsencode(self.filename), self.flag_bits & ~0x800


def zip_files(entries: dict[str, Path], dest: Path) -> ZipResult:
    """Write a deterministic archive of ``entries`` to ``dest``, atomically, streaming each file.

    An input that cannot be read stops the archive (nothing is written): NoInputError names the input."""
    nbytes = 0
    with fsio.atomic_write(dest) as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for name, path in entries.items():
            info = _EntryInfo(name, date_time=FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # Unix, so external_attr carries the permission bits
            try:
                src = open(path, "rb")  # noqa: SIM115 - closed below; the error must name the input
                size = os.fstat(src.fileno()).st_size
            except OSError as exc:
                raise NoInputError(f"{path}: cannot read: {exc.strerror}", hint=f"{dest} was not written") from exc
            with src:
                mode = 0o755 if os.access(path, os.X_OK) else 0o644
                info.external_attr = (stat.S_IFREG | mode) << 16
                with zf.open(info, "w", force_zip64=size >= zipfile.ZIP64_LIMIT) as out:
                    try:
                        while block := src.read(COPY_BLOCK):
                            out.write(block)
                    except OSError as exc:
                        if exc.filename is None and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                            raise
                        raise NoInputError(f"{path}: cannot read: {exc.strerror}",
                                           hint=f"{dest} was not written") from exc
            nbytes += size
    return ZipResult(len(entries), nbytes)


# --------------------------------------------------------------------------- unzip

def looks_like_zip(path: Path) -> bool:
    try:
        return fsio.read_head(path, 4) in ZIP_MAGIC
    except OSError:
        return False


def safe_member_path(info: zipfile.ZipInfo) -> PurePosixPath | None:
    """The relative path an entry extracts to, or raise when it would leave the target directory.

    Returns None for directory entries (directories are made as files need them).
    """
    name = info.filename
    if not info.flag_bits & 0x800 and not name.isascii():
        name = os.fsdecode(name.encode("cp437"))  # zipfile decoded raw (not UTF-8) name bytes as cp437: undo it
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DataError(f"entry {name!r} is a symbolic link; refused (it could point outside the target)")
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (len(parts[0]) == 2 and parts[0][1] == ":"):
        raise DataError(f"entry {name!r} has an absolute path; refused (zip-slip)")
    if ".." in parts:
        raise DataError(f"entry {name!r} climbs out of the target with '..'; refused (zip-slip)")
    if "\x00" in name:
        raise DataError(f"entry {name!r} has a NUL in its name; refused")
    clean = [p for p in parts if p not in ("", ".")]
    if info.is_dir() or not clean:
        return None
    return PurePosixPath(*clean)


class Unzip(BaseOperator):
    """Extract each archive into OUT (entries keep their relative paths); an archive that fails writes nothing."""

    name = "unzip"
    input_kind = "zip archive"
    collision_hint = "two archives hold the same entry; extract them into different directories"

    def accepts(self, path: Path) -> bool:
        # By content, and *.zip too, so a truncated archive is reported rather than skipped.
        return path.suffix.lower() == ".zip" or looks_like_zip(path)

    def process(self, item: Item, ctx: Context) -> Outcome:
        assert ctx.out is not None
        path = item.paths[0]
        outputs: list[Path] = []
        try:
            with zipfile.ZipFile(path) as zf:
                members = [(info, safe_member_path(info)) for info in zf.infolist()]  # check all before writing
                for info, rel in members:
                    if rel is None:
                        continue
                    dest = ctx.out.joinpath(*rel.parts)
                    with zf.open(info) as src, fsio.atomic_write(dest) as out:
                        shutil.copyfileobj(src, out, COPY_BLOCK)  # zipfile checks the CRC at the end
                    outputs.append(dest)
        except zipfile.BadZipFile as exc:
            raise DataError(f"corrupt zip archive: {exc}", hint="nothing of it was extracted") from None
        except (zlib.error, EOFError) as exc:
            raise DataError(f"corrupt zip archive: damaged data ({exc})", hint="nothing of it was extracted") from None
        except NotImplementedError as exc:
            raise DataError(f"unsupported zip archive: {exc}") from None
        except RuntimeError as exc:  # encrypted entries
            raise DataError(f"cannot extract: {exc}") from None
        return Outcome(outputs=outputs)
