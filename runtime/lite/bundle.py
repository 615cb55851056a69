"""Edge bundles: a prepared model's Paddle Lite ``.nb`` packed to run on a CPU with no platform present.

A bundle is a ``.tar.gz`` whose first member is ``bundle.json``:
    {"format": "paddlefn-edge-bundle", "format_version": 1, "bundle_id", "created_at", "target": "x86"|"arm",
     "lite_version": "2.12", "model_name", "function": {...caller's labels...}, "device_key", "platform_url",
     "files": {"model.nb": {"sha256", "size"}, "manifest.json": ..., "golden_inputs.npz": ..., ...},
     "meta_sha256": sha256 of this JSON without that field (canonical: sorted keys, no spaces)}
followed by exactly the files listed. Opening a bundle checks everything before anything is served: member
names and types (no paths, links or extras), every size and sha256, the meta digest, and that the Paddle Lite
that made the ``.nb`` is the one that will run it: ``.nb`` files fail or answer empty on another Lite version
(Paddle-Lite #9315, #7532), so a mismatch is refused with a message that says what to do.

The checksums catch corruption and edits of the contents. They are not a signature: whoever holds a bundle
holds its device key and can rebuild it. The device key identifies the bundle to the platform when the edge
uploads usage; the platform (which issued the key for one bundle of one function) decides what to accept.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import re
import secrets
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.spec import GOLDEN_INPUTS, GOLDEN_OUTPUTS, MANIFEST_NAME, Manifest

FORMAT = "paddlefn-edge-bundle"
FORMAT_VERSION = 1
META = "bundle.json"
NB = "model.nb"
# Bundle ids name folders on edge devices (the default data dir): keep them to safe file-name characters.
BUNDLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # matched whole: "$" lets a final newline through
MAX_MEMBER_BYTES = 4 * 1024**3  # a .nb beyond this is not an edge model; refuse before unpacking it


class BundleError(Exception):
    """The bundle cannot be made or served; the message says why and what to do."""


@dataclass(frozen=True)
class OpenedBundle:
    meta: dict[str, Any]
    folder: Path  # holds manifest.json, model.nb and the golden files: a model dir for PaddleLiteEngine

    @property
    def bundle_id(self) -> str:
        return str(self.meta["bundle_id"])

    @property
    def device_key(self) -> str:
        return str(self.meta["device_key"])


def export_bundle(
    model_dir: Path,
    out: Path,
    *,
    device_key: str,
    target: str = "x86",
    bundle_id: str | None = None,
    model_name: str | None = None,
    function: dict[str, Any] | None = None,
    platform_url: str | None = None,
) -> dict[str, Any]:
    """Write OUT (``bundle.tar.gz``) from a prepared model folder; return its ``bundle.json``.

    x86 uses the ``.nb`` that deploy converted and checked; arm converts the normalised program that deploy
    kept (``lite/model.pdmodel``) again for arm (it cannot be run here, so its golden check is the edge's).
    """
    if target not in ("x86", "arm"):
        raise BundleError(f"target must be x86 or arm, not {target!r}")
    if not device_key:
        raise BundleError("a bundle needs a device key (the platform issues one per bundle)")
    if bundle_id is not None and not BUNDLE_ID.fullmatch(bundle_id):
        raise BundleError(f"bundle id {bundle_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
    manifest = Manifest.load(model_dir)
    lite = manifest.lite or {}
    if not lite.get("available"):
        raise BundleError(f"this model has no Paddle Lite version: {lite.get('reason') or 'not converted'}")
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        staging = Path(tmp)
        if target == "x86":
            shutil.copyfile(model_dir / str(lite["nb"]), staging / NB)
        else:
            _convert_arm(model_dir, staging / NB)
        bundled = Manifest.from_json(manifest.to_json())
        bundled.lite = {**lite, "nb": NB, "target": target}
        bundled.save(staging)
        names = [NB, MANIFEST_NAME]
        for golden in (GOLDEN_INPUTS, GOLDEN_OUTPUTS):
            if (model_dir / golden).exists():
                shutil.copyfile(model_dir / golden, staging / golden)
                names.append(golden)
        meta: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "bundle_id": bundle_id or secrets.token_hex(8),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "target": target,
            "lite_version": str(lite.get("version", "")),
            "model_name": model_name or model_dir.name,
            "function": function or {},
            "device_key": device_key,
            "platform_url": platform_url,
            "files": {
                n: {"sha256": _sha256(staging / n), "size": (staging / n).stat().st_size} for n in names
            },
        }
        meta["meta_sha256"] = _meta_digest(meta)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        with tarfile.open(partial, "w:gz") as tar:
            data = json.dumps(meta, indent=2).encode()
            info = tarfile.TarInfo(META)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(data))
            for name in names:
                tar.add(staging / name, arcname=name, recursive=False)
        partial.replace(out)  # a reader never sees half a bundle
    return meta


def _convert_arm(model_dir: Path, nb: Path) -> None:
    from runtime.lite.convert import SOURCE_DIR, ConversionError, optimise

    source = model_dir / SOURCE_DIR
    if not (source / "model.pdmodel").exists():
        raise BundleError("deploy kept no Lite source program for this model; redeploy it to export for arm")
    try:
        optimise(source / "model.pdmodel", source / "model.pdiparams", nb, target="arm")
    except ConversionError as exc:
        raise BundleError(f"converting for arm failed: {exc}") from None


def read_meta(bundle: Path) -> dict[str, Any]:
    """``bundle.json`` of BUNDLE, checked for format only (no checksums): for listing and CLIs."""
    try:
        with tarfile.open(bundle, "r:gz") as tar:
            member = tar.next()
            if member is None or member.name != META or not member.isfile():
                raise BundleError(
                    f"{bundle.name} is not a paddlefn edge bundle: it does not start with {META}"
                )
            handle = tar.extractfile(member)
            assert handle is not None
            meta = json.loads(handle.read(1024 * 1024))
    except (OSError, tarfile.TarError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{bundle.name} is not a readable bundle (corrupt or truncated): {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{bundle.name} is not a paddlefn edge bundle ({META} has no format {FORMAT!r})")
    if not BUNDLE_ID.fullmatch(str(meta.get("bundle_id", ""))):
        raise BundleError(f"{bundle.name} has an invalid bundle id {meta.get('bundle_id')!r}: refused")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{bundle.name} has bundle format version {meta.get('format_version')}; this runtime reads version "
            f"{FORMAT_VERSION}: export it again with this platform version"
        )
    return meta


def open_bundle(
    bundle: Path, dest: Path, *, lite_version: str | None = None, check_target: bool = True
) -> OpenedBundle:
    """Verify BUNDLE completely and unpack it into DEST (replaced); raise BundleError on anything wrong.

    LITE_VERSION is the runtime's Paddle Lite version (default: ask the Lite interpreter here).
    """
    meta = read_meta(bundle)
    if meta.get("meta_sha256") != _meta_digest(meta):
        raise BundleError(f"{bundle.name} was modified: {META} does not match its digest; get a fresh bundle")
    files = meta.get("files")
    if not isinstance(files, dict) or NB not in files or MANIFEST_NAME not in files:
        raise BundleError(f"{bundle.name} lists no {NB} and {MANIFEST_NAME}: not a complete bundle")
    _check_version(bundle, meta, lite_version)
    if check_target:
        _check_target(bundle, str(meta.get("target")))
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    seen: set[str] = set()
    try:
        with tarfile.open(bundle, "r:gz") as tar:
            for member in tar:
                name = member.name
                if name == META and not seen:
                    seen.add(name)
                    _write(tar, member, dest / name)
                    continue
                if name not in files or name in seen or "/" in name or name.startswith("."):
                    raise BundleError(f"{bundle.name} holds an unexpected member {name!r}: refused")
                if not member.isfile() or member.size > MAX_MEMBER_BYTES:
                    raise BundleError(
                        f"{bundle.name}: member {name!r} is not a plain file of sane size: refused"
                    )
                seen.add(name)
                _write(tar, member, dest / name)
                want = files[name]
                got = _sha256(dest / name)
                if got != want.get("sha256") or (dest / name).stat().st_size != want.get("size"):
                    raise BundleError(
                        f"{bundle.name} is corrupt or was tampered with: {name} has sha256 {got[:16]}..., "
                        f"the bundle says {str(want.get('sha256'))[:16]}...; get a fresh bundle"
                    )
    except (OSError, tarfile.TarError, EOFError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise BundleError(f"{bundle.name} is not a readable bundle (corrupt or truncated): {exc}") from None
    except BundleError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    missing = sorted(set(files) - seen)
    if missing:
        shutil.rmtree(dest, ignore_errors=True)
        raise BundleError(f"{bundle.name} is incomplete: {', '.join(missing)} missing")
    return OpenedBundle(meta, dest)


def _check_version(bundle: Path, meta: dict[str, Any], lite_version: str | None) -> None:
    if lite_version is None:
        from runtime.lite import installed_version, unavailable_reason

        lite_version = installed_version()
        if lite_version is None:
            raise BundleError(f"cannot serve {bundle.name}: {unavailable_reason()}")
    made_by = str(meta.get("lite_version"))
    if made_by != lite_version:
        raise BundleError(
            f"{bundle.name} was converted by Paddle Lite {made_by} but this runtime has Paddle Lite {lite_version}; "
            f".nb files fail or answer empty on another Lite version, so it is refused: install "
            f"paddlelite=={made_by} here, or export the bundle again from a platform with Paddle Lite {lite_version}"
        )


def _check_target(bundle: Path, target: str) -> None:
    machine = platform.machine().lower()
    here = (
        "arm"
        if machine.startswith(("arm", "aarch"))
        else "x86"
        if machine in ("x86_64", "amd64", "i686")
        else machine
    )
    if target != here:
        raise BundleError(f"{bundle.name} was built for {target} but this machine is {here} ({machine})")


def _write(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise BundleError(f"member {member.name!r} has no content")
    with source, path.open("wb") as sink:
        shutil.copyfileobj(source, sink, 1024 * 1024)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _meta_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
