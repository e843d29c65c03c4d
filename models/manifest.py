"""Model manifests: what a model dir must contain, byte for byte.

A model dir is only ever loaded after its manifest verifies, so a half-copied or tampered
export fails loudly at load time instead of producing garbage queries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
_CHUNK = 1 << 20  # 1 MiB: model files can be hundreds of MB


class ModelIntegrityError(Exception):
    """A model dir does not match its manifest (or has no usable manifest)."""


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    created_at: datetime
    parent: str | None = None
    files: dict[str, str]  # relative posix path -> sha256 hex
    # Sizes let verification reject truncated copies without hashing them first.
    sizes: dict[str, int] = Field(default_factory=dict)
    export: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _payload_files(model_dir: Path) -> dict[str, Path]:
    """Every regular file under model_dir except the manifest, keyed by posix relative path."""
    out: dict[str, Path] = {}
    for path in sorted(model_dir.rglob("*")):
        if path.is_file():
            rel = path.relative_to(model_dir).as_posix()
            if rel != MANIFEST_FILE:
                out[rel] = path
    return out


def write_manifest(
    model_dir: Path,
    name: str,
    version: str,
    parent: str | None = None,
    export: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Manifest:
    """Hash every file in ``model_dir`` and write ``manifest.json`` (atomically)."""
    model_dir = Path(model_dir)
    files = _payload_files(model_dir)
    if not files:
        raise ModelIntegrityError(f"{model_dir} has no files to put in a manifest")
    manifest = Manifest(
        name=name,
        version=version,
        created_at=datetime.now(UTC),
        parent=parent,
        files={rel: sha256_file(p) for rel, p in files.items()},
        sizes={rel: p.stat().st_size for rel, p in files.items()},
        export=dict(export or {}),
        metrics=dict(metrics or {}),
    )
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=model_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(manifest.model_dump_json(indent=2))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the manifest is as public as the model
        os.replace(tmp, model_dir / MANIFEST_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("wrote manifest for %s %s (%d files) in %s", name, version, len(files), model_dir)
    return manifest


def read_manifest(model_dir: Path) -> Manifest:
    """Parse ``manifest.json`` without checking any file against it."""
    path = Path(model_dir) / MANIFEST_FILE
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise ModelIntegrityError(f"{path} is missing") from None
    except (ValidationError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelIntegrityError(f"{path} is not a valid manifest: {exc}") from exc


def _check_rel_path(model_dir: Path, rel: str) -> None:
    # A manifest is data from disk too: never let it point outside the model dir.
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ModelIntegrityError(f"manifest in {model_dir} lists an unsafe path {rel!r}")


def verify_manifest(model_dir: Path) -> Manifest:
    """Re-hash ``model_dir`` against its manifest; raise ModelIntegrityError on any difference."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    on_disk = _payload_files(model_dir)
    for rel in manifest.files:
        _check_rel_path(model_dir, rel)
    missing = sorted(set(manifest.files) - set(on_disk))
    if missing:
        raise ModelIntegrityError(f"{model_dir}: file {missing[0]!r} listed in the manifest is missing")
    extra = sorted(set(on_disk) - set(manifest.files))
    if extra:
        raise ModelIntegrityError(f"{model_dir}: file {extra[0]!r} is not listed in the manifest")
    # Cheap size pass first so a truncated copy fails without hashing hundreds of MB.
    for rel, expected_size in manifest.sizes.items():
        size = on_disk[rel].stat().st_size if rel in on_disk else None
        if size != expected_size:
            raise ModelIntegrityError(
                f"{model_dir}: file {rel!r} has size {size}, manifest says {expected_size}"
            )
    for rel, expected in manifest.files.items():
        actual = sha256_file(on_disk[rel])
        if actual != expected.lower():
            raise ModelIntegrityError(
                f"{model_dir}: checksum mismatch for {rel!r} (sha256 {actual[:12]}…, manifest {expected[:12]}…)"
            )
    log.debug("manifest for %s %s verified in %s", manifest.name, manifest.version, model_dir)
    return manifest
