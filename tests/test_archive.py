"""functions.archive.unpack: real .tar(.gz/.bz2/.xz) and .zip archives built here, good ones and hostile ones."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from functions.archive import Limits, unpack
from functions.errors import BadRequest, PayloadTooLarge, PlatformError

LIMITS = Limits(max_bytes=16 << 20, max_files=100)
MODEL = {
    "model.pdmodel": b"program bytes " * 100,
    "model.pdiparams": bytes(range(256)) * 64,
    "example_inputs.npz": b"PK inputs",
}


# ------------------------------------------------------------------------------------------------ builders


def tar_entry(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, target: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    if kind == tarfile.REGTYPE:
        info.size = len(data)
    return info, data


def make_tar(entries: list[tuple], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


def zip_entry(name: str, data: bytes = b"", mode: int | None = None) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name, date_time=(2026, 11, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    if mode is not None:
        info.external_attr = mode << 16
    return info, data


def make_zip(entries: list[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return buf.getvalue()


def model_files(prefix: str = "") -> list[tuple]:
    return [tar_entry(prefix + name, data) for name, data in MODEL.items()]


def unpacked(dest: Path) -> dict[str, bytes]:
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in sorted(dest.rglob("*")) if p.is_file()}


def refused(archive: bytes, tmp_path: Path, error: type[PlatformError], limits: Limits = LIMITS) -> str:
    """Unpack ARCHIVE expecting ERROR; the destination must be gone afterwards. Returns the message."""
    dest = tmp_path / "out"
    with pytest.raises(PlatformError) as info:
        unpack(io.BytesIO(archive), dest, limits)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert info.value.status == {BadRequest: 400, PayloadTooLarge: 413}[error]
    assert not dest.exists(), "the destination folder must be removed on refusal"
    assert tmp_path.exists()
    return info.value.message


# ----------------------------------------------------------------------------------------------- good ones


@pytest.mark.parametrize("mode", ["w:gz", "w", "w:bz2", "w:xz"])
def test_a_good_tar_unpacks_byte_for_byte(tmp_path: Path, mode: str) -> None:
    entries = [
        tar_entry("weights", kind=tarfile.DIRTYPE),
        *model_files(),
        tar_entry("weights/extra.bin", b"\0\1"),
    ]
    dest = tmp_path / "out"
    unpack(io.BytesIO(make_tar(entries, mode)), dest, LIMITS)
    assert unpacked(dest) == {**MODEL, "weights/extra.bin": b"\0\1"}


def test_a_tar_of_a_folder_with_dot_entries_unpacks(tmp_path: Path) -> None:
    # `tar -C model -czf m.tar.gz .` writes "./" and "./name" entries.
    entries = [tar_entry(".", kind=tarfile.DIRTYPE), *model_files("./")]
    dest = tmp_path / "out"
    unpack(io.BytesIO(make_tar(entries)), dest, LIMITS)
    assert unpacked(dest) == MODEL


def test_a_tar_made_from_files_on_disk_unpacks(tmp_path: Path) -> None:
    src = tmp_path / "mnv3"
    src.mkdir()
    for name, data in MODEL.items():
        (src / name).write_bytes(data)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src, arcname="mnv3")  # one wrapping folder, as people usually pack
    dest = tmp_path / "out"
    unpack(io.BytesIO(buf.getvalue()), dest, LIMITS)
    assert unpacked(dest) == {f"mnv3/{k}": v for k, v in MODEL.items()}


def test_a_good_zip_unpacks_byte_for_byte(tmp_path: Path) -> None:
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    for name, data in MODEL.items():
        (src / name).write_bytes(data)
    (src / "sub" / "notes.txt").write_bytes(b"hello")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(src.rglob("*")):
            zf.write(path, path.relative_to(src).as_posix())  # real file modes, folder entries included
    dest = tmp_path / "out"
    unpack(io.BytesIO(buf.getvalue()), dest, LIMITS)
    assert unpacked(dest) == {**MODEL, "sub/notes.txt": b"hello"}


def test_a_zip_written_from_memory_unpacks(tmp_path: Path) -> None:
    # ZipFile.writestr(name, data) records mode 0o600 without a file type: still a regular file.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in MODEL.items():
            zf.writestr(name, data)
        zf.writestr("docs/", b"")
    dest = tmp_path / "out"
    unpack(io.BytesIO(buf.getvalue()), dest, LIMITS)
    assert unpacked(dest) == MODEL
    assert (dest / "docs").is_dir()


def test_limits_are_inclusive(tmp_path: Path) -> None:
    total = sum(len(d) for d in MODEL.values())
    dest = tmp_path / "out"
    unpack(io.BytesIO(make_tar(model_files())), dest, Limits(max_bytes=total, max_files=len(MODEL)))
    assert unpacked(dest) == MODEL


def test_an_existing_destination_is_refused_and_left_alone(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        unpack(io.BytesIO(make_tar(model_files())), dest, LIMITS)
    assert (dest / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("name", ["../evil.pdmodel", "weights/../../evil", "a/b/../../../evil", "..", "./.."])
def test_traversal_in_tar_is_refused(tmp_path: Path, name: str) -> None:
    archive = make_tar([*model_files(), tar_entry(name, b"owned")])
    message = refused(archive, tmp_path, BadRequest)
    assert message == f"archive entry '{name}' points outside the archive; use relative paths only"
    assert not (tmp_path / "evil.pdmodel").exists() and not (tmp_path / "evil").exists()


@pytest.mark.parametrize("name", ["../evil", "ok/../../evil", "..\\evil", "ok\\..\\..\\evil"])
def test_traversal_in_zip_is_refused(tmp_path: Path, name: str) -> None:
    archive = make_zip([zip_entry("model.pdmodel", b"x"), zip_entry(name, b"owned")])
    message = refused(archive, tmp_path, BadRequest)
    assert message == f"archive entry '{name}' points outside the archive; use relative paths only"
    assert not (tmp_path / "evil").exists()


def test_absolute_path_in_tar_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "passwd"
    message = refused(make_tar([tar_entry(str(target), b"root::0:0")]), tmp_path, BadRequest)
    assert message == f"archive entry '{target}' points outside the archive; use relative paths only"
    assert not target.exists()


def test_absolute_path_in_zip_is_refused(tmp_path: Path) -> None:
    # ZipInfo strips a leading "/" itself, so write the raw name the way a hostile tool would.
    info, data = zip_entry("/etc/passwd", b"root::0:0")
    info.filename = "/etc/passwd"
    message = refused(make_zip([(info, data)]), tmp_path, BadRequest)
    assert message == "archive entry '/etc/passwd' points outside the archive; use relative paths only"


def test_symlink_in_tar_is_refused(tmp_path: Path) -> None:
    archive = make_tar([*model_files(), tar_entry("model.json", kind=tarfile.SYMTYPE, target="/etc/passwd")])
    message = refused(archive, tmp_path, BadRequest)
    assert message == "archive entry 'model.json' is a link; links are not allowed"


def test_hard_link_in_tar_is_refused(tmp_path: Path) -> None:
    archive = make_tar(
        [*model_files(), tar_entry("copy.pdiparams", kind=tarfile.LNKTYPE, target="model.pdiparams")]
    )
    message = refused(archive, tmp_path, BadRequest)
    assert message == "archive entry 'copy.pdiparams' is a link; links are not allowed"


def test_symlink_in_zip_is_refused(tmp_path: Path) -> None:
    link = zip_entry("model.pdiparams", b"/etc/shadow", mode=stat.S_IFLNK | 0o777)
    message = refused(make_zip([zip_entry("model.pdmodel", b"x"), link]), tmp_path, BadRequest)
    assert message == "archive entry 'model.pdiparams' is a link; links are not allowed"


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_device_files_and_fifos_in_tar_are_refused(tmp_path: Path, kind: bytes) -> None:
    message = refused(make_tar([tar_entry("dev", kind=kind)]), tmp_path, BadRequest)
    assert message == "archive entry 'dev' is not a regular file or folder"


def test_fifo_in_zip_is_refused(tmp_path: Path) -> None:
    archive = make_zip([zip_entry("pipe", b"", mode=stat.S_IFIFO | 0o644)])
    assert refused(archive, tmp_path, BadRequest) == "archive entry 'pipe' is not a regular file or folder"


def test_too_many_entries(tmp_path: Path) -> None:
    entries = [tar_entry(f"f{i}.txt", b"x") for i in range(4)]
    message = refused(make_tar(entries), tmp_path, PayloadTooLarge, Limits(max_bytes=1 << 20, max_files=3))
    assert message == "the archive has more than 3 entries"


def test_too_many_entries_in_zip_counts_folders_too(tmp_path: Path) -> None:
    entries = [zip_entry("a/"), zip_entry("b/"), zip_entry("a/x", b"1"), zip_entry("b/y", b"2")]
    message = refused(make_zip(entries), tmp_path, PayloadTooLarge, Limits(max_bytes=1 << 20, max_files=3))
    assert message == "the archive has more than 3 entries"


def test_zip_bomb_in_miniature_is_stopped(tmp_path: Path) -> None:
    bomb = make_zip([zip_entry("model.pdiparams", bytes(8 << 20))])  # 8 MiB of zeros
    assert len(bomb) < 64 << 10  # compresses to a few KiB
    message = refused(bomb, tmp_path, PayloadTooLarge, Limits(max_bytes=1 << 20, max_files=10))
    assert message == "the archive unpacks to more than 1 MiB"


def test_tar_gz_bomb_in_miniature_is_stopped(tmp_path: Path) -> None:
    bomb = make_tar([tar_entry("model.pdiparams", bytes(8 << 20))])
    assert len(bomb) < 64 << 10
    message = refused(bomb, tmp_path, PayloadTooLarge, Limits(max_bytes=1 << 20, max_files=10))
    assert message == "the archive unpacks to more than 1 MiB"


def test_unpacked_size_is_counted_across_files(tmp_path: Path) -> None:
    # Three files of 0.5 MiB each: none over 1 MiB alone, 1.5 MiB together.
    entries = [tar_entry(f"part{i}", bytes(512 << 10)) for i in range(3)]
    message = refused(make_tar(entries), tmp_path, PayloadTooLarge, Limits(max_bytes=1 << 20, max_files=10))
    assert message == "the archive unpacks to more than 1 MiB"


@pytest.mark.parametrize(
    "data", [b"this is not an archive", b"", b"\x1f\x8b" + b"\0" * 100, b"PK\x03\x04junk"]
)
def test_not_an_archive(tmp_path: Path, data: bytes) -> None:
    message = refused(data, tmp_path, BadRequest)
    assert message == "the model archive is neither a .tar.gz, .tar nor a .zip file, or it is truncated"


def test_an_empty_tar_unpacks_to_an_empty_folder(tmp_path: Path) -> None:
    # Two zero blocks are a complete, empty tar; finding no model in it is deploy's job (test_prepare).
    dest = tmp_path / "out"
    unpack(io.BytesIO(bytes(1024)), dest, LIMITS)
    assert dest.is_dir() and list(dest.iterdir()) == []


def test_a_gzipped_file_that_is_not_a_tar(tmp_path: Path) -> None:
    import gzip

    message = refused(gzip.compress(b"model.pdmodel contents, not a tar"), tmp_path, BadRequest)
    assert ".tar.gz" in message


def big_model_tar(mode: str = "w:gz") -> bytes:
    # Incompressible-ish data so that cuts land inside file data, not only in headers.
    import random

    rng = random.Random(0)
    return make_tar(
        [
            tar_entry("model.pdmodel", rng.randbytes(100_000)),
            tar_entry("model.pdiparams", rng.randbytes(100_000)),
        ],
        mode,
    )


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9, 0.999])
def test_truncated_tar_gz(tmp_path: Path, keep: float) -> None:
    archive = big_model_tar()
    message = refused(archive[: int(len(archive) * keep)], tmp_path, BadRequest)
    assert message.startswith("the archive is damaged or truncated: "), message


def test_tar_gz_cut_at_its_very_start(tmp_path: Path) -> None:
    archive = big_model_tar()
    message = refused(archive[:10], tmp_path, BadRequest)
    assert "truncated" in message


def test_truncated_plain_tar_inside_file_data(tmp_path: Path) -> None:
    archive = big_model_tar("w")
    message = refused(archive[:150_000], tmp_path, BadRequest)
    assert message == "the archive is damaged or truncated: unexpected end of data"


@pytest.mark.parametrize("extra", [0, 100])
def test_truncated_plain_tar_at_or_inside_a_header(tmp_path: Path, extra: int) -> None:
    archive = big_model_tar("w")
    first_member_end = 512 + 100_000 + (-100_000 % 512)
    message = refused(archive[: first_member_end + extra], tmp_path, BadRequest)
    assert message == "the archive is truncated: it stops before its end-of-archive marker"


def test_corrupted_tar_gz_is_caught_by_its_checksum(tmp_path: Path) -> None:
    archive = bytearray(big_model_tar())
    middle = len(archive) // 2
    archive[middle : middle + 64] = bytes(b ^ 0xFF for b in archive[middle : middle + 64])
    message = refused(bytes(archive), tmp_path, BadRequest)
    assert message.startswith("the archive is damaged or truncated: "), message


def test_corrupted_compressed_data_in_tar_gz(tmp_path: Path) -> None:
    text = b"".join(b"line %d of a very compressible file\n" % i for i in range(20_000))
    archive = bytearray(make_tar([tar_entry("model.pdmodel", text)]))
    for i in range(len(archive) // 2, len(archive) // 2 + 16):
        archive[i] ^= 0x0F
    message = refused(bytes(archive), tmp_path, BadRequest)
    assert message.startswith("the archive is damaged or truncated: "), message


def test_truncated_zip(tmp_path: Path) -> None:
    archive = make_zip([zip_entry(n, d) for n, d in MODEL.items()])
    message = refused(archive[: len(archive) // 2], tmp_path, BadRequest)
    assert "truncated" in message


def test_corrupted_zip_data(tmp_path: Path) -> None:
    text = b"".join(b"line %d of a very compressible file\n" % i for i in range(20_000))
    archive = bytearray(make_zip([zip_entry("model.pdmodel", text)]))
    for i in range(100, 105):
        archive[i] ^= 0x0F
    message = refused(bytes(archive), tmp_path, BadRequest)
    assert message.startswith("the archive is damaged or uses an unsupported compression: "), message


def test_encrypted_zip_entry(tmp_path: Path) -> None:
    archive = bytearray(make_zip([zip_entry("model.pdmodel", b"secret")]))
    central = archive.find(b"PK\x01\x02")
    archive[central + 8] |= 0x1  # general purpose flag bit 0: encrypted
    message = refused(bytes(archive), tmp_path, BadRequest)
    assert message == "archive entry 'model.pdmodel' is encrypted; upload it without a password"


def test_a_file_twice_in_tar(tmp_path: Path) -> None:
    archive = make_tar([*model_files(), tar_entry("model.pdmodel", b"another program")])
    assert refused(archive, tmp_path, BadRequest) == "archive holds 'model.pdmodel' twice"


def test_a_file_twice_under_different_spellings_in_tar(tmp_path: Path) -> None:
    archive = make_tar([tar_entry("w/model.pdiparams", b"1"), tar_entry("./w//model.pdiparams", b"2")])
    assert refused(archive, tmp_path, BadRequest) == "archive holds 'model.pdiparams' twice"


def test_a_file_twice_in_zip(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        archive = make_zip([zip_entry("model.pdmodel", b"1"), zip_entry("model.pdmodel", b"2")])
    assert refused(archive, tmp_path, BadRequest) == "archive holds 'model.pdmodel' twice"


def test_refusal_after_files_were_written_removes_them_all(tmp_path: Path) -> None:
    # Good files first, deep folders included; the link comes last.
    entries = [
        tar_entry("a/b/c", kind=tarfile.DIRTYPE),
        *model_files("a/b/c/"),
        tar_entry("zz", kind=tarfile.SYMTYPE, target="a"),
    ]
    refused(make_tar(entries), tmp_path, BadRequest)
    assert list(tmp_path.iterdir()) == []
