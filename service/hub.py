"""The Hugging Face Hub protocol's read side, over statehub's models (``/hf``).

A repo id is a model name ``namespace/name``. Revisions: ``main`` is the latest version,
every alias is a branch, ``vN`` is a tag for version N, and every version has a 40-hex
commit id derived from it (stable: the same version always has the same id). A version
pushed as a folder serves its files; any other version serves one file, ``model.safetensors``
(its stored bytes). Every file is announced as an LFS file whose oid is its sha256, so the
Hub's clients check and cache it by that digest.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr
from sqlalchemy.orm import Session

from service import folders, registry
from service.core.names import LATEST, ModelName, VersionRef, validate_alias
from service.core.repo_files import FileEntry
from service.errors import Conflict, Forbidden, HubNotFound, InvalidRequest, NotFound
from service.settings import Settings
from service.storage import repositories as repo
from service.storage.blobs import BlobStore
from service.storage.db import Database
from service.storage.models import Alias, Model, Version
from service.storage.spool import spool_bytes

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
    version: Version | None  # None: a repo created (create_repo) with no version yet
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
    if version is None and revision == MAIN and not repo.list_versions(session, model):
        # An empty repo, as the Hub has one after create_repo: its main holds no file.
        return Revision(model, None, _oid(f"statehub:{name}:empty"), [], [])
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
        composed = repo.composed_files(session, (f.sha256 for f in files))
        return [
            HubFile(f.path, f.size, f.sha256, composed[f.sha256].extents)
            if f.sha256 in composed
            else HubFile(f.path, f.size, f.sha256, None)
            for f in files
        ]
    return [HubFile(SINGLE_FILE, version.size, version.digest, version.extents)]


def model_info(revision: Revision) -> dict[str, Any]:
    """``GET /api/models/{repo}[/revision/{rev}]``, as huggingface_hub's ModelInfo reads it."""
    version = revision.version
    when = version.created_at if version is not None else revision.model.created_at
    return {
        "_id": revision.commit[:24],
        "id": revision.repo_id,
        "modelId": revision.repo_id,
        "sha": revision.commit,
        "private": True,  # readable only with access to the namespace
        "gated": False,
        "disabled": False,
        "lastModified": _hub_time(when),
        "createdAt": _hub_time(when),
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


# -- the write side: create_repo, preupload, LFS batch, commit -------------------------------

_PROCESS_KEY = secrets.token_bytes(32)
UPLOAD_URL_S = 3600


def _upload_key(secret: SecretStr | None) -> bytes:
    # Without a configured secret, a key of this process: URLs do not outlive a restart
    # and one replica cannot check another's (STATEHUB_HUB_UPLOAD_SECRET, SECURITY.md).
    return secret.get_secret_value().encode() if secret else _PROCESS_KEY


def sign(secret: SecretStr | None, *fields: object) -> str:
    """An HMAC of ``fields`` under the upload key: what a capability the server hands out
    (an LFS upload URL, a direct push) carries, and checks when it comes back."""
    message = "\n".join(str(field) for field in fields).encode()
    return hmac.new(_upload_key(secret), message, hashlib.sha256).hexdigest()


def upload_signature(
    secret: SecretStr | None, name: ModelName, oid: str, size: int, expires: int
) -> str:
    """The capability an LFS upload URL carries: the Hub's clients PUT to it without a token."""
    return sign(secret, name, oid, size, expires)


def check_upload(
    secret: SecretStr | None, name: ModelName, oid: str, size: int, expires: int, signature: str
) -> None:
    expected = upload_signature(secret, name, oid, size, expires)
    if not hmac.compare_digest(expected, signature) or expires < time.time():
        raise Forbidden("this upload URL is not valid (expired, or not signed by this server)")


@dataclass(frozen=True)
class CommitLines:
    """A commit's NDJSON payload, parsed: what to add (as stored blobs) and what to delete."""

    summary: str
    added: dict[str, FileEntry]  # path -> file (LFS files, and regular files once stored)
    inline: dict[str, bytes]  # path -> content of a regular (base64) file, to be stored
    deleted: set[str]
    deleted_folders: set[str]


def parse_commit(raw: bytes) -> CommitLines:
    summary = ""
    added: dict[str, FileEntry] = {}
    inline: dict[str, bytes] = {}
    deleted: set[str] = set()
    folders_gone: set[str] = set()
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = str(value.get("summary", ""))
            elif key == "lfsFile":
                if value.get("algo", "sha256") != "sha256":
                    raise InvalidRequest(f"line {number}: LFS files are addressed by sha256")
                added[value["path"]] = FileEntry(value["path"], int(value["size"]), value["oid"])
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise InvalidRequest(f"line {number}: file content must be base64")
                inline[value["path"]] = base64.b64decode(value["content"], validate=True)
            elif key == "deletedFile":
                deleted.add(value["path"])
            elif key == "deletedFolder":
                folders_gone.add(value["path"].strip("/"))
            else:
                raise InvalidRequest(
                    f"line {number}: {key!r} is not a commit operation statehub takes"
                )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if isinstance(exc, InvalidRequest):
                raise
            raise InvalidRequest(
                f"line {number} of the commit is not a commit operation: {exc}"
            ) from None
    return CommitLines(summary, added, inline, deleted, folders_gone)


def commit_manifest(base: Sequence[HubFile], lines: CommitLines) -> list[dict[str, Any]]:
    """The files of the new version: the parent's, less what is deleted, plus what is added."""
    files = {f.path: {"path": f.path, "size": f.size, "sha256": f.sha256} for f in base}
    for path in list(files):
        if path in lines.deleted or any(
            path.startswith(f"{folder}/") for folder in lines.deleted_folders
        ):
            del files[path]
    for path, entry in lines.added.items():
        files[path] = entry.to_json()
    return list(files.values())


def commit(
    *,
    db: Database,
    blobs: BlobStore,
    settings: Settings,
    name: ModelName,
    revision: str,
    raw: bytes,
    actor: str,
) -> tuple[registry.PushResult, str]:
    """A Hub commit as the next version: the parent revision's files changed as the commit
    says (a commit to a branch that is an alias moves that alias; every commit moves
    ``main``). Returns the push and the new commit id."""
    lines = parse_commit(raw)
    for path, data in lines.inline.items():
        lines.added[path] = _store_inline(db, blobs, settings, path, data)
    with db.session() as session:
        try:
            base = resolve(session, name, revision).files
        except HubNotFound:  # a new repo, or a new branch: from main, if there is one
            try:
                base = resolve(session, name, MAIN).files
            except HubNotFound:
                base = []
    # A composed version's single file is not a stored blob: a commit cannot keep it.
    manifest = commit_manifest([f for f in base if f.extents is None], lines)
    alias = None if revision == MAIN else validate_alias(revision)
    result = folders.push_folder(
        db=db,
        blobs=blobs,
        settings=settings,
        name=name,
        manifest=manifest,
        metadata={"hub_commit": lines.summary} if lines.summary else {},
        alias=alias,
        actor=actor,
    )
    return result, commit_id(result.version.model, result.version)


def _store_inline(
    db: Database, blobs: BlobStore, settings: Settings, path: str, data: bytes
) -> FileEntry:
    spooled = spool_bytes(
        settings.effective_spool_dir, data, min_free_bytes=settings.spool_min_free_bytes
    )
    folders.store_file(
        db=db, blobs=blobs, settings=settings, sha256=spooled.digest, spooled=spooled
    )
    return FileEntry(path, len(data), spooled.digest)


def create_branch(session: Session, name: ModelName, branch: str, *, actor: str) -> None:
    """A branch is an alias: it starts at ``main``'s version (an empty repo's branch starts
    with its first commit). Conflict when it exists (``exist_ok`` clients go on)."""
    if branch == MAIN:
        return
    model = repo.get_model(session, name)
    if session.get(Alias, (model.id, validate_alias(branch))) is not None:
        raise Conflict(f"{name} has a branch {branch!r} already", detail={"branch": branch})
    latest = repo.list_versions(session, model)
    if latest:
        registry.set_alias(
            session=session, name=name, alias=branch, number=latest[-1].number, actor=actor
        )
