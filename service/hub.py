"""The Hugging Face Hub protocol's read side, over statehub's models (``/hf``).

A repo id is a model name ``namespace/name``. Revisions: ``main`` is the latest version,
every alias is a branch, ``vN`` is a tag for version N, and every version has a 40-hex
commit id derived from it (stable: the same version always has the same id). A version
pushed as a folder serves its files; any other version serves one file, ``model.safetensors``
(its stored bytes). Every file is announced as an LFS file whose oid is its sha256, so the
Hub's clients check and cache it by that digest.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session

from service.core.names import LATEST, ModelName, VersionRef
from service.errors import HubNotFound, NotFound
from service.storage import repositories as repo
from service.storage.models import Model, Version

MAIN = "main"
SINGLE_FILE = "model.safetensors"  # the one file of a version not pushed as a folder
_TAG = re.compile(r"^v([1-9][0-9]{0,11})$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
LFS_POINTER_SIZE = 134  # a git-lfs pointer file's usual size; the clients only display it


def commit_id(model: Model, version: Version) -> str:
    """The version's commit id: 40 hex digits, derived from what the version is."""
    text = f"statehub:{model.namespace}/{model.name}:{version.number}:{version.digest}:"
    text += version.files_digest or ""
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int
    sha256: str
    extents: list[Any] | None  # a composed version's single file is read through them


@dataclass(frozen=True)
class Revision:
    model: Model
    version: Version
    commit: str
    files: list[HubFile]
    aliases: list[str]

    def file(self, path: str) -> HubFile:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise HubNotFound(
            f"{self.repo_id} has no file {path!r} at revision {self.commit}",
            hub_code="EntryNotFound",
            commit=self.commit,
        )

    @property
    def repo_id(self) -> str:
        return f"{self.model.namespace}/{self.model.name}"


def resolve(session: Session, name: ModelName, revision: str) -> Revision:
    """The version a revision names, with its files (the caller has checked read access)."""
    try:
        model = repo.get_model(session, name)
    except NotFound:
        raise repo_not_found(name) from None
    version = _version(session, model, revision)
    if version is None:
        raise HubNotFound(
            f"{name} has no revision {revision!r} (main, an alias, vN, or a commit id)",
            hub_code="RevisionNotFound",
        )
    aliases = repo.aliases_by_version(session, model).get(version.id, [])
    files = _files(session, version)
    return Revision(model, version, commit_id(model, version), files, aliases)


def repo_not_found(name: ModelName) -> HubNotFound:
    """A repo that does not exist, or that the caller may not read: the same answer."""
    return HubNotFound(f"repository {name} not found", hub_code="RepoNotFound")


def _version(session: Session, model: Model, revision: str) -> Version | None:
    if revision == MAIN:
        revision = LATEST
    if tag := _TAG.match(revision):
        ref = VersionRef(number=int(tag.group(1)))
    elif _COMMIT.match(revision):
        matches = [v for v in repo.list_versions(session, model) if commit_id(model, v) == revision]
        return matches[0] if matches else None
    else:
        ref = VersionRef(alias=revision)
    try:
        return repo.resolve_version(session, model, ref)
    except NotFound:
        return None


def _files(session: Session, version: Version) -> list[HubFile]:
    files = repo.version_files(session, version)
    if files:
        return [HubFile(f.path, f.size, f.sha256, None) for f in files]
    return [HubFile(SINGLE_FILE, version.size, version.digest, version.extents)]


def model_info(revision: Revision) -> dict[str, Any]:
    """``GET /api/models/{repo}[/revision/{rev}]``, as huggingface_hub's ModelInfo reads it."""
    version = revision.version
    return {
        "_id": revision.commit[:24],
        "id": revision.repo_id,
        "modelId": revision.repo_id,
        "sha": revision.commit,
        "private": True,  # readable only with access to the namespace
        "gated": False,
        "disabled": False,
        "lastModified": _hub_time(version.created_at),
        "createdAt": _hub_time(version.created_at),
        "tags": ["statehub", *sorted(revision.aliases)],
        "siblings": [{"rfilename": f.path} for f in revision.files],
        "usedStorage": sum(f.size for f in revision.files),
    }


def _hub_time(when: datetime) -> str:
    """The Hub's timestamp form, ``2026-12-02T07:17:24.853Z`` (UTC; SQLite returns naive)."""
    utc = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def tree(revision: Revision, path: str, *, recursive: bool) -> list[dict[str, Any]]:
    """``GET /api/models/{repo}/tree/{rev}[/{path}]``: files and folders under ``path``."""
    prefix = f"{path.strip('/')}/" if path.strip("/") else ""
    entries: list[dict[str, Any]] = []
    folders: set[str] = set()
    for f in revision.files:
        if not f.path.startswith(prefix):
            continue
        rest = f.path[len(prefix) :]
        parts = rest.split("/")
        for depth in range(1, len(parts)):
            folder = prefix + "/".join(parts[:depth])
            if folder not in folders and (recursive or depth == 1):
                folders.add(folder)
                entries.append(
                    {"type": "directory", "path": folder, "oid": _oid(folder), "size": 0}
                )
        if recursive or len(parts) == 1:
            entries.append(
                {
                    "type": "file",
                    "path": f.path,
                    "size": f.size,
                    "oid": _oid(f.sha256),
                    "lfs": {"oid": f.sha256, "size": f.size, "pointerSize": LFS_POINTER_SIZE},
                }
            )
    if prefix and not entries:
        raise HubNotFound(
            f"{revision.repo_id} has no folder {path!r} at revision {revision.commit}",
            hub_code="EntryNotFound",
            commit=revision.commit,
        )
    return entries


def _oid(text: str) -> str:
    """A git-style object id (40 hex) for an entry; clients use the LFS sha256 for files."""
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
