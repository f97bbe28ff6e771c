"""Folders as versions (a ``save_pretrained`` output): push every file, download them back.

A push hashes every file, asks which the registry lacks, uploads those (content-addressed:
a retry or a file another version has already is free), then commits the manifest. A
missing safetensors file whose tensors the registry mostly stores already (the shard of a
fine-tune that holds its new head) is not uploaded whole: its missing tensors are, and the
server composes the file from its header and its tensors' hashes, byte for byte the same. A
snapshot writes every file of a version into a folder, each checked against its sha256,
written beside its place and renamed into it, so a folder never holds a partial file.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from statehub import _dedup, _direct
from statehub._cache import Cache
from statehub._errors import FilesMissing, IntegrityError, NotCached, NotFound, TensorsMissing
from statehub._models import Version

if TYPE_CHECKING:
    from statehub._client import Client, Progress

CHUNK = 8 * 1024 * 1024
# A missing safetensors file is composed from its tensors when at least this many of its
# bytes are stored already, even if they are less than the server's fraction for versions:
# the shard holding a fine-tune's new head (Llama-3-8B's last: ~10% of it unchanged) would
# otherwise store its unchanged tensors a second time. Below it, only a mostly-stored file
# is composed: a composition costs a request per new tensor, pushed and read.
COMPOSE_ENOUGH_SHARED_BYTES = 64 * 1024 * 1024


def manifest_of(folder: Path) -> list[dict[str, Any]]:
    """Every file under ``folder`` as ``{path, size, sha256}``; links are refused (a link
    may point outside the folder, and a registry keeps bytes, not links)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    entries = []
    for root, dirs, names in os.walk(folder):
        for name in sorted(dirs + names):
            path = Path(root) / name
            if path.is_symlink():
                raise ValueError(f"{path} is a symbolic link: push the file it points to instead")
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            if not path.is_file():
                raise ValueError(f"{path} is not a regular file")
            relative = path.relative_to(folder).as_posix()
            entries.append({"path": relative, "size": path.stat().st_size, "sha256": _sha256(path)})
    if not entries:
        raise ValueError(f"{folder} holds no files")
    return entries


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def push_folder(client: Client, model: str, folder: Path, params: dict[str, Any]) -> Version:
    """Upload what the registry lacks, then commit; a file collected in between (gc) is
    uploaded again once."""
    manifest = manifest_of(folder)
    by_sha = {entry["sha256"]: folder / entry["path"] for entry in manifest}
    for attempt in range(2):
        answer = client._json(
            "POST", f"/v1/models/{model}/files/missing", json={"sha256": sorted(by_sha)}
        )
        for sha in answer["missing"]:
            if not _compose(client, model, sha, by_sha[sha]):
                _upload(client, model, sha, by_sha[sha])
        try:  # safe to retry: the same files return the same version
            return client._post_version(f"{model}/versions/files", params, {"files": manifest})
        except FilesMissing:
            if attempt:
                raise
    raise AssertionError("unreachable")


def _compose(client: Client, model: str, sha: str, path: Path) -> bool:
    """A safetensors file sent as its missing tensors and composed by the server; False
    when it is better uploaded whole (not safetensors, mostly new bytes, an older server,
    or stored tensors collected meanwhile)."""
    pushable = _dedup.of_safetensors_file(path) if path.suffix == ".safetensors" else None
    if pushable is None or not pushable.hashes:
        return False
    if not client._upload_missing_tensors(
        model, pushable, None, enough_shared_bytes=COMPOSE_ENOUGH_SHARED_BYTES
    ):
        return False
    try:
        client._json(
            "POST",
            f"/v1/models/{model}/files/compose",
            json={**pushable.compose_body(), "sha256": sha},
            timeout=httpx.Timeout(None, connect=10.0),
        )
    except (TensorsMissing, NotFound):
        return False
    return True


def _upload(client: Client, model: str, sha: str, path: Path) -> None:
    """One file: straight to the store where the server offers it, else through it."""
    size = path.stat().st_size
    body = functools.partial(_direct.file_stream, path, CHUNK)
    if _direct.upload(client, model, size, body, sha256=sha) is not None:
        return
    response = client._send(
        lambda: client._http.build_request(
            "PUT",
            f"/v1/models/{model}/files/{sha}",
            content=body(),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            timeout=httpx.Timeout(None, connect=10.0),
        ),
        retry=True,  # content-addressed: storing twice is harmless
    )
    response.close()


def files_of(client: Client, model: str, ref: str) -> list[dict[str, Any]]:
    files: list[dict[str, Any]] = client._json("GET", f"/v1/models/{model}/versions/{ref}/files")
    return files


def download(
    client: Client,
    model: str,
    ref: str,
    path: str,
    dest: Path,
    *,
    sha256: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """One file of a version to ``dest``: resumable, written atomically, checked against
    the sha256 the server announces (and ``sha256`` when the caller knows it); kept in the
    client cache, so the same file again is a ``304`` copied from there."""
    from statehub._client import _download

    key = Cache.key("file", client.url, model, ref, path)
    url = f"/v1/models/{model}/versions/{ref}/files/{path}"
    stream = client._open_body(key, "file", f"{model}:{ref} {path}", "GET", url, None)
    _download(stream, dest, progress, verify_digest=True)
    if sha256 is not None and stream.digest != sha256:
        dest.unlink(missing_ok=True)
        raise IntegrityError(f"{path}: the server served sha256 {stream.digest}, not {sha256}")
    return dest


def snapshot(client: Client, model: str, ref: str, folder: Path) -> Path:
    """Every file of the version into ``folder``, byte for byte as pushed. The version it
    resolved and its listing are remembered, so offline the same snapshot comes from the
    cache."""
    key = Cache.key("snapshot", client.url, model, ref)
    if client.offline:
        listing = client.cache.recall(key) if client.cache is not None else None
        if listing is None:
            raise NotCached(
                f"{model}:{ref} was never snapshotted here, and STATEHUB_OFFLINE is set"
            )
        pinned, files = listing["version"], listing["files"]
    else:
        version = client._json("GET", f"/v1/models/{model}/versions/{ref}")
        pinned = str(version["version"])  # every file from one version, even if ref moves
        files = files_of(client, model, pinned)
        if client.cache is not None and files:
            client.cache.remember(key, {"version": pinned, "files": files})
    if not files:
        raise ValueError(
            f"{model}:{pinned} was not pushed as a folder; pull it with hub.pull(ref, path)"
        )
    root = folder.resolve()
    for entry in files:
        dest = (root / entry["path"]).resolve()
        if root not in dest.parents:  # the server validates paths; never trust a listing
            raise ValueError(f"refusing to write {entry['path']!r} outside {folder}")
        download(client, model, pinned, entry["path"], dest, sha256=entry["sha256"])
    return folder
