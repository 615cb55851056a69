"""Unpack an uploaded model archive (.tar.gz, .tar or .zip) without trusting anything in it.

Refused, each with a message that says so: absolute paths and ``..`` (path traversal), links of any kind, device
files, more than ``max_files`` entries, and more than ``max_bytes`` once unpacked (counted while writing, so an
archive that lies about its sizes is stopped as well).
"""

from __future__ import annotations

import lzma
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from functions.errors import BadRequest, PayloadTooLarge

_CHUNK = 1 << 20
MAX_DEPTH = 32  # folders an entry may be nested in
MAX_NAME = 1024  # characters of an entry's whole name
# Errors of the decompressors that are not OSError: corrupt data inside a .tar.gz/.tar.xz or a .zip.
_CORRUPT = (zlib.error, lzma.LZMAError)


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_files: int


def unpack(archive: IO[bytes], dest: Path, limits: Limits) -> None:
    """Unpack the (seekable) ARCHIVE into DEST (created); on any refusal DEST is removed and the error raised."""
    dest.mkdir(parents=True, exist_ok=False)
    try:
        if zipfile.is_zipfile(archive):
            archive.seek(0)
            _unpack_zip(archive, dest, limits)
        else:
            archive.seek(0)
            try:
                tar = tarfile.open(fileobj=archive, mode="r:*")  # noqa: SIM115 (closed by `with tar` below)
            except (tarfile.TarError, OSError, EOFError, *_CORRUPT):
                raise BadRequest(
                    "the model archive is neither a .tar.gz, .tar nor a .zip file, or it is truncated"
                ) from None
            with tar:
                _unpack_tar(tar, dest, limits)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _safe_path(dest: Path, name: str) -> Path | None:
    """Where NAME goes under DEST, or None for the archive's own root entry; raises on traversal."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts:
        raise BadRequest(f"archive entry '{name}' points outside the archive; use relative paths only")
    parts = [p for p in pure.parts if p not in ("", ".")]
    if not parts:
        return None
    if len(parts) > MAX_DEPTH or len(name) > MAX_NAME or any(len(p.encode()) > 255 for p in parts):
        raise BadRequest(
            f"archive entry '{name[:100]}...' is nested too deep or named too long: at most {MAX_DEPTH} folders, "
            f"{MAX_NAME} characters in all and 255 bytes per name"
        )
    return dest.joinpath(*parts)


def _reason(exc: BaseException) -> str:
    """An error's reason without the file names in it (they are the platform's paths, not the tenant's)."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)


class _Budget:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.files = 0
        self.bytes = 0

    def entry(self) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise PayloadTooLarge(f"the archive has more than {self.limits.max_files} entries")

    def copy(self, src: IO[bytes], path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("xb") as out:
            while chunk := src.read(_CHUNK):
                self.bytes += len(chunk)
                if self.bytes > self.limits.max_bytes:
                    raise PayloadTooLarge(
                        f"the archive unpacks to more than {self.limits.max_bytes // (1 << 20)} MiB"
                    )
                out.write(chunk)


def _unpack_tar(tar: tarfile.TarFile, dest: Path, limits: Limits) -> None:
    budget = _Budget(limits)
    try:
        for member in tar:
            budget.entry()
            path = _safe_path(dest, member.name)
            if member.issym() or member.islnk():
                raise BadRequest(f"archive entry '{member.name}' is a link; links are not allowed")
            if member.isdir():
                if path is not None:
                    path.mkdir(parents=True, exist_ok=True)
                continue
            if not member.isfile() or path is None:
                raise BadRequest(f"archive entry '{member.name}' is not a regular file or folder")
            src = tar.extractfile(member)
            if src is None:
                raise BadRequest(f"archive entry '{member.name}' cannot be read")
            with src:
                budget.copy(src, path)
        # tarfile stops quietly where a header is cut short or missing: a complete archive ends with a whole
        # (zero) block.
        if tar.fileobj.tell() - tar.offset != tarfile.BLOCKSIZE:
            raise BadRequest("the archive is truncated: it stops before its end-of-archive marker")
        # Read to the end, so that a compressed stream's checksum and end marker are verified.
        while tar.fileobj.read(_CHUNK):
            pass
    except FileExistsError as exc:
        raise BadRequest(f"archive holds '{Path(exc.filename).name}' twice") from None
    except (tarfile.TarError, EOFError, OSError, *_CORRUPT) as exc:
        raise BadRequest(f"the archive is damaged or truncated: {_reason(exc)}") from None


def _unpack_zip(archive: IO[bytes], dest: Path, limits: Limits) -> None:
    budget = _Budget(limits)
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                budget.entry()
                path = _safe_path(dest, info.filename)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise BadRequest(f"archive entry '{info.filename}' is a link; links are not allowed")
                if info.is_dir():
                    if path is not None:
                        path.mkdir(parents=True, exist_ok=True)
                    continue
                # Only the permission bits may be set (Python's ZipFile.writestr writes 0o600): still a file.
                if path is None or (stat.S_IFMT(mode) and not stat.S_ISREG(mode)):
                    raise BadRequest(f"archive entry '{info.filename}' is not a regular file or folder")
                if info.flag_bits & 0x1:
                    raise BadRequest(
                        f"archive entry '{info.filename}' is encrypted; upload it without a password"
                    )
                with zf.open(info) as src:
                    budget.copy(src, path)
    except FileExistsError as exc:
        raise BadRequest(f"archive holds '{Path(exc.filename).name}' twice") from None
    except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError, *_CORRUPT) as exc:
        raise BadRequest(
            f"the archive is damaged or uses an unsupported compression: {_reason(exc)}"
        ) from None
