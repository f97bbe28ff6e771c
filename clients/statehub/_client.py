"""The statehub client: push checkpoints, fetch them fitted to your model, plan, search."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import mmap
import os
import queue
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
import torch
from safetensors import safe_open

from statehub import _dedup, _direct, _folders
from statehub._cache import Cache, CachedBody, Receiver, offline_from_env
from statehub._errors import (
    ConnectionFailed,
    FilesMissing,
    IntegrityError,
    NotCached,
    NotFound,
    StatehubError,
    StatehubWarning,
    StorageError,
    TensorsMissing,
    raise_for_status,
)
from statehub._models import FetchedStateDict, Plan, Version
from statehub._tensors import (
    SAFETENSORS_SUFFIXES,
    TORCH_SUFFIXES,
    DictSink,
    ModuleLoader,
    StreamReader,
    TensorSink,
    dedupe_tied,
    iter_safetensors,
    model_facts,
    no_values_error,
    read_into,
    safetensors_header,
    spec_of,
    state_dict_of,
    valueless_keys,
)

DEFAULT_URL = "http://127.0.0.1:8000"
POLICY_KEYS = (
    "strict",
    "head",
    "embedding",
    "on_missing",
    "allow_structural",
    "allow_ops",
    "adapters",
    "builtin",
    "params",
)
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
CHUNK = 1024 * 1024
Chunk = bytes | memoryview


class Progress(Protocol):
    """A progress callback: ``progress(bytes_done, bytes_total)``, called as bytes move.

    ``bytes_done`` is the absolute count; after a retried upload it starts again at 0.
    A ``tqdm`` bar fits in two lines::

        bar = tqdm(unit="B", unit_scale=True)
        hub.push(name, path, progress=lambda done, total: bar.update(done - bar.n))
    """

    def __call__(self, done: int, total: int, /) -> None: ...


def split_ref(ref: str) -> tuple[str, str]:
    """``ns/name@prod`` -> ("ns/name", "prod"); ``ns/name:3`` -> ("ns/name", "3");
    a bare name means namespace ``default`` and version ``latest``."""
    if "@" in ref:
        model, _, version = ref.partition("@")
    else:
        head, sep, tail = ref.rpartition(":")
        model, version = (head, tail) if sep and tail.isdigit() else (ref, "latest")
    if "/" not in model:
        model = f"default/{model}"
    return model, version


def _policy(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(options) - set(POLICY_KEYS)
    if unknown:
        raise TypeError(f"unknown policy option(s) {sorted(unknown)}; use {list(POLICY_KEYS)}")
    policy = dict(options)
    for key in ("allow_ops", "adapters"):
        if key in policy and policy[key] is not None:
            policy[key] = list(policy[key])
    return policy


def _fit_body(target: Any, policy: Mapping[str, Any]) -> dict[str, Any]:
    """A plan / fetch / search request: the target's spec and the policy, and what a
    transformers target's config says that recipes may need (``facts``: ``head_dim``)."""
    body: dict[str, Any] = {"target": spec_of(target), "policy": _policy(policy)}
    if facts := model_facts(target):
        body["facts"] = facts
    return body


class Client:
    """A connection to a statehub server.

    Args:
        url: server address; default ``STATEHUB_URL`` or ``http://127.0.0.1:8000``.
        token: bearer token; default ``STATEHUB_TOKEN``.
        timeout: seconds to wait for the server to answer (not for a whole transfer).
        retries: attempts for idempotent calls on connection errors and 408/429/5xx.
        cache: where fetched and pulled bodies are kept (default ``STATEHUB_CACHE`` or
            ``~/.cache/statehub``, at most ``STATEHUB_CACHE_MAX_BYTES``, 50 GiB); a repeated
            fetch revalidates with ``If-None-Match`` and loads a ``304`` from there.
            ``False``: no cache.
        offline: answer fetches and pulls from the cache alone, with no request (default
            ``STATEHUB_OFFLINE``); what it lacks raises :class:`NotCached`.

    Example:
        >>> hub = Client()
        >>> hub.push("vision/resnet50-rsp", model, alias="prod")
        >>> sd = hub.fetch("vision/resnet50-rsp@prod", target=my_model)
        >>> my_model.load_state_dict(sd)
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        cache: str | os.PathLike[str] | bool | None = None,
        offline: bool | None = None,
    ) -> None:
        self.url = (url or os.environ.get("STATEHUB_URL") or DEFAULT_URL).rstrip("/")
        self.offline = offline_from_env() if offline is None else offline
        self.cache: Cache | None = None
        if cache is not False:
            self.cache = Cache.from_env(None if cache is None or cache is True else cache)
        if self.offline and self.cache is None:
            raise ValueError("offline=True serves from the cache: it needs one (cache=False)")
        token = token or os.environ.get("STATEHUB_TOKEN")
        headers = {"User-Agent": "statehub-client/0.1"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.retries = retries
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ------------------------------------------------------------------------

    def _send(self, make: Callable[[], httpx.Request], *, retry: bool) -> httpx.Response:
        """Send with backoff on connection errors and retryable statuses (if ``retry``);
        offline, nothing is sent."""
        if self.offline:
            request = make()
            raise NotCached(
                f"STATEHUB_OFFLINE is set: {request.method} {request.url.path} needs the server"
            )
        attempts = self.retries if retry else 1
        for attempt in range(attempts):
            try:
                response = self._http.send(make(), stream=True)
            except httpx.TransportError as exc:
                if attempt + 1 == attempts:
                    raise ConnectionFailed(f"cannot reach statehub at {self.url}: {exc}") from exc
            else:
                if response.status_code not in RETRY_STATUSES or attempt + 1 == attempts:
                    if response.status_code >= 400:
                        raise_for_status(response)
                    return response
                response.close()
            time.sleep(min(0.25 * 2**attempt, 4.0))
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, *, retry: bool = True, **kwargs: Any) -> Any:
        response = self._send(lambda: self._http.build_request(method, path, **kwargs), retry=retry)
        try:
            response.read()
        finally:
            response.close()
        return response.json() if response.content else None

    # -- models and versions --------------------------------------------------------------

    def push(
        self,
        name: str,
        obj: Any,
        *,
        alias: str | None = None,
        metadata: dict[str, Any] | None = None,
        ema: bool = False,
        progress: Progress | None = None,
    ) -> Version:
        """Upload a checkpoint as the next version of ``name`` (created if new).

        Args:
            name: ``namespace/name`` (namespace ``default`` if omitted).
            obj: an ``nn.Module``, a dict of tensors, a path to a .safetensors /
                .pth / .pt / .bin file (training snapshots are unpacked by the server), or
                a folder (``save_pretrained`` output: see :meth:`push_folder`).
            alias: also point this alias (e.g. ``prod``) at the new version.
            metadata: JSON-able data kept with the version.
            ema: take the EMA weights of a training snapshot instead of the raw ones.
            progress: called with ``(bytes_sent, bytes_total)`` while the body uploads
                (a deduplicated push counts only the tensors it sends).

        Returns:
            The stored :class:`Version` (``created=False`` when identical bytes were
            already a version of this model: pushing is idempotent, so it is retried).

        Raises:
            InvalidCheckpoint, UnsafePickle, TooLarge, InvalidName, ConnectionFailed.
            FileNotFoundError / ValueError: a path that is missing or not a checkpoint.

        Example:
            >>> v = hub.push("vision/resnet", "ckpt.pth", alias="prod", metadata={"top1": 0.71})
            >>> v.ref
            'vision/resnet:1'
        """
        if isinstance(obj, (str, Path)) and Path(obj).expanduser().is_dir():
            if ema:
                raise ValueError("ema applies to a training snapshot file, not a folder")
            return self.push_folder(name, obj, alias=alias, metadata=metadata)
        model, _ = split_ref(name)
        params: dict[str, Any] = {"ema": str(ema).lower()}
        if alias:
            params["alias"] = alias
        if metadata:
            params["metadata"] = json.dumps(metadata)
        pushable = self._pushable(obj, ema)
        if pushable is not None:
            composed = self._push_composed(model, pushable, params, progress)
            if composed is not None:
                return composed
        if pushable is not None and pushable.body is not None:
            # the host copies the dedup pass made: a module on a GPU is copied once in all
            body, length = pushable.body, pushable.size
        else:
            body, length = self._upload_body(obj)
        direct = self._push_direct(model, body, length, params, progress)
        if direct is not None:
            return direct
        response = self._send(
            lambda: self._http.build_request(
                "POST",
                f"/v1/models/{model}/versions",
                params=params,
                content=_counted(body(), length, progress),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(length)},
                timeout=httpx.Timeout(None, connect=10.0),
            ),
            retry=True,  # safe: identical bytes return the existing version
        )
        try:
            response.read()
        finally:
            response.close()
        return Version.from_json(response.json(), created=response.status_code == 201)

    def _push_composed(
        self,
        model: str,
        pushable: _dedup.Pushable,
        params: dict[str, Any],
        progress: Progress | None,
    ) -> Version | None:
        """Upload only the tensors the registry lacks, then compose the version from its
        header and every tensor's hash. None when a plain upload is the better push (most
        bytes are new) or the server cannot compose."""
        if not self._upload_missing_tensors(model, pushable, progress):
            return None
        try:  # safe to retry: the same header and hashes return the same version
            version = self._post_version(
                f"{model}/versions/compose", params, pushable.compose_body()
            )
        except TensorsMissing:
            return None  # collected between upload and compose: a plain upload settles it
        expected = pushable.file_digest()
        if version.digest != expected:
            raise IntegrityError(
                f"the server composed a file with digest {version.digest}; "
                f"the pushed checkpoint hashes to {expected}"
            )
        return version

    def _push_direct(
        self,
        model: str,
        body: Callable[[], Iterator[bytes | memoryview]],
        length: int,
        params: dict[str, Any],
        progress: Progress | None,
    ) -> Version | None:
        """Upload the checkpoint straight to the registry's store, then make the version
        from it. None when the server takes uploads through itself (a local store, a small
        checkpoint), or when the stored blob was collected before the version was made."""
        digest = _direct.upload(self, model, length, body, progress)
        if digest is None:
            return None
        try:  # safe to retry: the same blob returns the same version
            return self._post_version(f"{model}/versions/stored", params, {"sha256": digest})
        except FilesMissing:
            return None  # collected meanwhile (gc): the plain upload settles it

    def _post_version(self, path: str, params: dict[str, Any], body: dict[str, Any]) -> Version:
        """POST ``/v1/models/{path}`` with a JSON body that makes a version (retried: each
        such body names its bytes, so the same one again is the same version); no read
        timeout, as the server may read a large stored blob first."""
        response = self._send(
            lambda: self._http.build_request(
                "POST",
                f"/v1/models/{path}",
                params=params,
                json=body,
                timeout=httpx.Timeout(None, connect=10.0),
            ),
            retry=True,
        )
        try:
            response.read()
        finally:
            response.close()
        return Version.from_json(response.json(), created=response.status_code == 201)

    def _upload_missing_tensors(
        self,
        model: str,
        pushable: _dedup.Pushable,
        progress: Progress | None,
        *,
        enough_shared_bytes: int | None = None,
    ) -> bool:
        """Upload the tensors the registry lacks, for a composition; False (nothing sent)
        when the server does not deduplicate, or when too little is stored already for a
        composition to be worth it: less than the server's fraction of the bytes and, where
        given, less than ``enough_shared_bytes``."""
        try:
            answer = self._json(
                "POST", f"/v1/models/{model}/tensors/missing", json={"sha256": list(pushable.sizes)}
            )
        except NotFound:
            return False  # a server without deduplication
        missing = set(answer["missing"])
        total = sum(pushable.sizes.values())
        shared = total - sum(pushable.sizes[sha] for sha in missing)
        wanted = answer["min_shared_fraction"] * total
        if enough_shared_bytes is not None:
            wanted = min(wanted, enough_shared_bytes)
        if shared <= 0 or shared < wanted:
            return False
        self._upload_tensors(model, pushable, missing, progress)
        return True

    def _upload_tensors(
        self,
        model: str,
        pushable: _dedup.Pushable,
        missing: set[str],
        progress: Progress | None,
    ) -> None:
        """Each missing tensor once (the same bytes under two keys are one upload)."""
        pending = {sha: key for key, sha in pushable.hashes.items() if sha in missing}
        total = sum(pushable.sizes[sha] for sha in pending)
        done = 0
        if progress is not None:
            progress(0, total)
        for sha, key in pending.items():
            data = pushable.read(key)
            self._json(  # content-addressed: storing twice is harmless, so retries are safe
                "PUT",
                f"/v1/models/{model}/tensors/{sha}",
                content=data,
                headers={"Content-Type": "application/octet-stream"},
                timeout=httpx.Timeout(None, connect=10.0),
            )
            done += len(data)
            if progress is not None:
                progress(done, total)

    @staticmethod
    def _pushable(obj: Any, ema: bool) -> _dedup.Pushable | None:
        """A state_dict or a .safetensors file can be pushed tensor by tensor; torch files
        are the server's to unpack, and ``ema`` asks it to."""
        if ema:
            return None
        if not isinstance(obj, (str, Path)):
            return _dedup.of_state_dict(_items_to_push(obj))
        path = Path(obj)
        if path.suffix not in SAFETENSORS_SUFFIXES or not path.is_file():
            return None
        return _dedup.of_safetensors_file(path)

    @staticmethod
    def _upload_body(obj: Any) -> tuple[Callable[[], Iterator[bytes | memoryview]], int]:
        if isinstance(obj, (str, Path)):
            path = Path(obj)
            if not path.is_file():
                raise FileNotFoundError(f"no such checkpoint file: {path}")
            if path.suffix not in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
                raise ValueError(
                    f"{path.name}: expected a .safetensors, .pth, .pt, .bin or .ckpt file"
                )

            return functools.partial(_direct.file_stream, path, CHUNK), path.stat().st_size
        items = _items_to_push(obj)
        header = safetensors_header(items)
        length = len(header) + sum(t.numel() * t.element_size() for _, t in items)
        return (lambda: iter_safetensors(items, header)), length

    def get_model(self, name: str) -> dict[str, Any]:
        """A model with its versions and aliases.

        Args:
            name: ``namespace/name`` (a version part, if any, is ignored).

        Returns:
            The server's model JSON: ``namespace``, ``name``, ``description``, ``tags``,
            ``latest_version``, ``aliases`` (alias -> version) and ``versions``.

        Raises:
            NotFound, ConnectionFailed.
        """
        model, _ = split_ref(name)
        return self._json("GET", f"/v1/models/{model}")

    def list_models(
        self,
        *,
        query: str | None = None,
        namespace: str | None = None,
        tag: str | None = None,
        arch_fp: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> dict[str, Any]:
        """Models, newest first, optionally filtered.

        Args:
            query: substring of the name or description.
            namespace: only this namespace.
            tag: only models with this tag.
            arch_fp: only models with a version of this architecture fingerprint.
            limit: page size (1-500).
            offset: page start.

        Returns:
            ``{"items": [model, ...], "total": n, "limit": ..., "offset": ...}``.

        Raises:
            InvalidRequest, ConnectionFailed.
        """
        params = {"q": query, "namespace": namespace, "tag": tag, "arch_fp": arch_fp}
        params = {k: v for k, v in params.items() if v is not None}
        return self._json("GET", "/v1/models", params={**params, "limit": limit, "offset": offset})

    def delete_model(self, name: str, *, hard: bool = False) -> None:
        """Delete a model with its versions and aliases (admin).

        Args:
            name: ``namespace/name``.
            hard: remove it for good; by default it is soft-deleted and
                :meth:`restore_model` brings it back.

        Raises:
            NotFound, Forbidden, ConnectionFailed.
        """
        model, _ = split_ref(name)
        self._json("DELETE", f"/v1/models/{model}", params={"hard": hard}, retry=False)

    def restore_model(self, name: str) -> dict[str, Any]:
        """Undo a soft delete of a model (admin). Returns the model JSON.

        Raises:
            NotFound, Forbidden, ConnectionFailed.
        """
        model, _ = split_ref(name)
        return self._json("POST", f"/v1/models/{model}/restore", retry=False)

    def delete_version(self, ref: str, *, hard: bool = False) -> None:
        """Delete one version (admin); ``latest`` moves to the newest remaining one.

        Args:
            ref: ``ns/name:3`` (or an alias / digest reference).
            hard: remove it for good; by default it is soft-deleted (restorable).

        Raises:
            NotFound, Forbidden, ConnectionFailed.
        """
        model, version = split_ref(ref)
        path = f"/v1/models/{model}/versions/{version}"
        self._json("DELETE", path, params={"hard": hard}, retry=False)

    def restore_version(self, name: str, version: int) -> Version:
        """Undo a soft delete of version number ``version`` of ``name`` (admin).

        Raises:
            NotFound, Forbidden, ConnectionFailed.
        """
        model, _ = split_ref(name)
        data = self._json("POST", f"/v1/models/{model}/versions/{version}/restore", retry=False)
        return Version.from_json(data)

    def versions(self, name: str) -> list[Version]:
        """Every version of a model, oldest first (without specs).

        Raises:
            NotFound, ConnectionFailed.
        """
        model, _ = split_ref(name)
        return [Version.from_json(v) for v in self._json("GET", f"/v1/models/{model}/versions")]

    def version(self, ref: str) -> Version:
        """One version, with its spec.

        Args:
            ref: ``ns/name`` (latest), ``ns/name:3``, ``ns/name@prod`` or ``ns/name@sha256:...``.

        Raises:
            NotFound, InvalidRef, ConnectionFailed.
        """
        model, version = split_ref(ref)
        return Version.from_json(self._json("GET", f"/v1/models/{model}/versions/{version}"))

    # -- versions pushed as folders -------------------------------------------------------

    def push_folder(
        self,
        name: str,
        folder: str | Path,
        *,
        alias: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Version:
        """Push a folder (``save_pretrained`` output) as the next version of ``name``: every
        file byte for byte, its weights (one .safetensors, an index and its shards, or one
        torch file) as the version's tensors. ``push(name, folder)`` does the same.

        Only files the registry lacks are uploaded. Symbolic links are refused.

        Raises:
            InvalidRequest (bad paths, no or ambiguous weights), InvalidCheckpoint, TooLarge,
            FileNotFoundError, ValueError (a link, an empty folder), ConnectionFailed.
        """
        model, _ = split_ref(name)
        params: dict[str, Any] = {}
        if alias:
            params["alias"] = alias
        if metadata:
            params["metadata"] = json.dumps(metadata)
        return _folders.push_folder(self, model, Path(folder).expanduser(), params)

    def files(self, ref: str) -> list[dict[str, Any]]:
        """The files of a version pushed as a folder: ``[{path, size, sha256}, ...]``."""
        model, version = split_ref(ref)
        return _folders.files_of(self, model, version)

    def download(
        self, ref: str, path: str, dest: str | Path, *, progress: Progress | None = None
    ) -> Path:
        """One file of a version (``config.json``) to ``dest``, checked against its sha256."""
        model, version = split_ref(ref)
        return _folders.download(
            self, model, version, path, Path(dest).expanduser(), progress=progress
        )

    def snapshot(self, ref: str, folder: str | Path) -> Path:
        """Every file of a version into ``folder``, byte for byte as pushed (all from one
        version, even if an alias moves meanwhile)."""
        model, version = split_ref(ref)
        return _folders.snapshot(self, model, version, Path(folder).expanduser())

    def set_alias(self, name: str, alias: str, version: int) -> dict[str, Any]:
        """Point ``alias`` (e.g. ``prod``) of model ``name`` at ``version``.

        Returns:
            ``{"model": ..., "alias": ..., "version": ...}``.

        Raises:
            NotFound (no such model or version), InvalidName, ConnectionFailed.
        """
        model, _ = split_ref(name)
        return self._json("PUT", f"/v1/models/{model}/aliases/{alias}", json={"version": version})

    # -- adapters -------------------------------------------------------------------------

    def register_adapter(self, adapter: dict[str, Any]) -> dict[str, Any]:
        """Register a declarative adapter; an existing name gets its next version.

        Args:
            adapter: ``{"name": ..., "description": ..., "scope": {...}, "rules": [...]}``;
                rules are data (rename, drop, prefix, op), never code.

        Returns:
            The stored adapter (with its ``version``).

        Raises:
            InvalidAdapter (``detail["errors"]`` lists every problem), ConnectionFailed.
        """
        return self._json("POST", "/v1/adapters", json=adapter, retry=False)

    def builtin_recipes(self) -> list[dict[str, Any]]:
        """The server's built-in recipes (name, version, description, layout signature,
        rules): conversions that apply by themselves where their signature matches."""
        return self._json("GET", "/v1/adapters/builtin")

    def adapters(self) -> list[dict[str, Any]]:
        """The newest version of every registered adapter.

        Raises:
            ConnectionFailed.
        """
        return self._json("GET", "/v1/adapters")

    # -- tokens and operations ------------------------------------------------------------

    def create_token(
        self, name: str, scopes: list[str], *, expires_at: str | None = None
    ) -> dict[str, Any]:
        """Create a bearer token; its value (``["token"]``) is shown this once.

        Args:
            name: a label (letters, digits, ``.``, ``_``, ``-``).
            scopes: ``action:pattern`` strings: action ``read``, ``write`` or ``admin``
                (each implies the ones before), pattern ``*``, ``ns/*`` or ``ns/name``.
            expires_at: an ISO 8601 time after which the token stops working.

        Returns:
            The token's record with ``token`` (the value), ``id`` and ``prefix``.

        Raises:
            Forbidden (a scope the caller does not hold with admin), InvalidRequest.

        Example:
            >>> hub.create_token("ci", ["read:vision/*"])["token"]
            'shb_...'
        """
        body: dict[str, Any] = {"name": name, "scopes": list(scopes)}
        if expires_at is not None:
            body["expires_at"] = expires_at
        return self._json("POST", "/v1/tokens", json=body, retry=False)

    def tokens(self) -> list[dict[str, Any]]:
        """The tokens the caller administers (never their values).

        Raises:
            Forbidden (no admin scope), ConnectionFailed.
        """
        return self._json("GET", "/v1/tokens")

    def revoke_token(self, token_id: int) -> dict[str, Any]:
        """Revoke a token by id (idempotent).

        Raises:
            NotFound, Forbidden, ConnectionFailed.
        """
        return self._json("DELETE", f"/v1/tokens/{int(token_id)}")

    def gc(self, *, dry_run: bool = False, grace_s: int | None = None) -> dict[str, Any]:
        """Collect unreferenced blobs and stale temp files on the server (``admin:*``).

        Args:
            dry_run: report what would be deleted, delete nothing.
            grace_s: only what is older than this many seconds (default: the server's).

        Returns:
            ``{"blobs_deleted": [...], "bytes_freed": n, "temp_files_deleted": [...], ...}``.

        Raises:
            Forbidden, ConnectionFailed.
        """
        body: dict[str, Any] = {"dry_run": dry_run}
        if grace_s is not None:
            body["grace_s"] = grace_s
        return self._json("POST", "/v1/admin/gc", json=body, retry=False)

    # -- fitting --------------------------------------------------------------------------

    def plan(self, ref: str, *, target: Any, **policy: Any) -> Plan:
        """How ``ref`` maps onto ``target``; no weights move (the CI gate's question).

        Args:
            ref: a version reference (DESIGN section 2).
            target: an ``nn.Module``, a state_dict, a spec dict, or a path to a checkpoint
                or spec JSON file. Only its spec is sent.
            **policy: ``strict``, ``head``, ``embedding``, ``on_missing``,
                ``allow_structural``, ``allow_ops``, ``adapters``, ``builtin`` (False turns
                the built-in recipes off), ``params`` (model facts a recipe needs, such as
                ``{"head_dim": 128}``; a transformers model's config gives them itself).

        Returns:
            The :class:`Plan`; ``incompatible`` is a verdict here, not an error.

        Raises:
            NotFound, InvalidSpec, ConnectionFailed; TypeError for an unknown policy option.

        Example:
            >>> plan = hub.plan("vision/resnet@prod", target=model)
            >>> plan.verdict, plan.keep_target
            ('partial', ['fc.weight', 'fc.bias'])
        """
        model, version = split_ref(ref)
        body = _fit_body(target, policy)
        data = self._json("POST", f"/v1/models/{model}/versions/{version}/plan", json=body)
        return Plan.from_json(data["plan"], data["plan_id"])

    def diff(self, a: str, b: Any, **policy: Any) -> Plan:
        """What differs between version ``a`` and ``b``, as the planner sees it.

        Args:
            a: a version reference (the source).
            b: another version reference, or anything :meth:`plan` takes as a target.
            **policy: as for :meth:`plan`.

        Returns:
            The plan of ``a`` onto ``b``'s spec.

        Raises:
            NotFound, ConnectionFailed.
        """
        target = b
        if isinstance(b, str) and not Path(b).exists():
            target = self.version(b).spec
        return self.plan(a, target=target, **policy)

    def find_compatible(
        self, target: Any, *, limit: int = 10, **policy: Any
    ) -> list[dict[str, Any]]:
        """Stored versions ranked by how well they fit ``target`` (best first).

        Args:
            target: as for :meth:`plan`.
            limit: at most this many candidates.
            **policy: as for :meth:`plan`.

        Returns:
            ``[{"ref", "model", "version", "digest", "verdict", "coverage"}, ...]``.

        Raises:
            InvalidSpec, ConnectionFailed.
        """
        body = _fit_body(target, policy) | {"limit": limit}
        return self._json("POST", "/v1/search/compatible", json=body)

    def fetch(
        self,
        ref: str,
        *,
        target: Any,
        device: str | torch.device | None = None,
        load: bool = False,
        assign: bool = False,
        progress: Progress | None = None,
        **policy: Any,
    ) -> FetchedStateDict:
        """A state_dict of ``ref`` fitted to ``target``, ready for a strict ``load_state_dict``.

        A target on the ``meta`` device is a spec: it works wherever no key needs its
        values. When the plan keeps target keys that have no values (on ``meta``, or a
        spec), the fetch is planned first and refused before any weight moves.

        Args:
            ref: ``ns/name``, ``ns/name:3``, ``ns/name@prod`` or ``ns/name@sha256:...``.
            target: the model (or its state_dict) the weights are for. Keys the plan keeps
                from the target are filled from the target's own state_dict; a spec, a
                file or a model on ``meta`` works too when every key comes from the
                checkpoint.
            device: where to place each tensor as it arrives (``"cuda"``...), so the host
                holds about one tensor, not the whole dict. With ``load=True`` and
                ``assign=False`` the module's tensors must already be there.
            load: load into ``target`` (an ``nn.Module``) strictly, as the stream arrives:
                peak memory is the model plus about one tensor. The values are copied into
                the module's tensors (``load_state_dict`` semantics). If the transfer fails
                midway the module holds a mix of old and new values: fetch again.
            assign: with ``load``, the fetched tensors become the module's (on ``device``,
                default the CPU), as ``load_state_dict(sd, assign=True)``: for a model built
                on ``meta``. Parameters keep their ``requires_grad``; tied weights stay
                tied. Buffers no state_dict holds (``persistent=False``) stay on ``meta``
                with a warning naming them: the module computes those.
            progress: called with ``(bytes_received, bytes_total)`` as the stream arrives.
            **policy: ``strict``, ``head``, ``embedding``, ``on_missing``,
                ``allow_structural``, ``allow_ops``, ``adapters``.

        Returns:
            A dict of tensors in the target's key order (with ``load``, the module's own
            tensors after loading, as its ``state_dict()`` gives them: no copy), carrying
            the plan it was fitted by (``.plan``) and its version (``.source``).

        Raises:
            Incompatible: the policy forbids what fitting would need (``.plan`` says why).
            StatehubError: the plan keeps keys the target has no values for
                (``detail["keep_target"]`` names them); nothing was downloaded.
            NotFound, ConnectionFailed, IntegrityError; TypeError / ValueError for
            arguments that cannot work together (checked before any request).

        Example:
            >>> sd = hub.fetch("vision/resnet@prod", target=model, head="keep")
            >>> model.load_state_dict(sd)
            >>> with torch.device("meta"):
            ...     llm = LlamaForCausalLM(config)
            >>> hub.fetch("nlp/llama@prod", target=llm, load=True, assign=True, device="cuda")
        """
        place = torch.device(device) if device is not None else None
        if load:
            _check_loadable(target, assign=assign, device=place)
        elif assign:
            raise TypeError("assign=True loads into the target: pass load=True as well")
        model, version = split_ref(ref)
        body = _fit_body(target, policy)
        key = Cache.key("fetch", self.url, model, version, body)
        valueless = valueless_keys(target)
        plan_first = None
        if valueless:  # a cached body needs no plan: _complete refuses what lacks values

            def plan_first() -> str:
                digest_ref = self._plan_before_fetch(model, version, body, valueless)
                return f"/v1/models/{model}/versions/{digest_ref}/fetch"

        path = f"/v1/models/{model}/versions/{version}/fetch"
        stream = self._open_body(key, "fetch", ref, "POST", path, body, plan_first=plan_first)
        if load:
            loader = ModuleLoader(target, assign=assign, device=place)
            metadata = self._fetch_stream(stream, progress, loader)
            loader.finish()
            result = FetchedStateDict.of(target.state_dict(), metadata)
            _warn_if_partial(ref, metadata, result, explicit="on_missing" in policy)
            return result
        if isinstance(stream, _CachedBody):  # memory-mapped: no copy of the whole body
            received, metadata = stream.load(place, progress)
        else:
            sink = DictSink(place)
            metadata = self._fetch_stream(stream, progress, sink)
            received = sink.tensors
        result = FetchedStateDict.of(self._complete(received, metadata, target, place), metadata)
        _warn_if_partial(ref, metadata, result, explicit="on_missing" in policy)
        return result

    def _plan_before_fetch(
        self, model: str, version: str, body: dict[str, Any], valueless: set[str]
    ) -> str:
        """Plan a fetch into a target without some values (on ``meta``, a spec): a plan that
        keeps any of those keys is refused here, before a weight moves. Returns the planned
        version's digest reference, so an alias that moves meanwhile cannot change the plan."""
        data = self._json("POST", f"/v1/models/{model}/versions/{version}/plan", json=body)
        plan = Plan.from_json(data["plan"], data["plan_id"])
        if plan.verdict != "incompatible":  # the fetch answers Incompatible with its plan
            lacking = [key for key in plan.keep_target if key in valueless]
            if lacking:
                raise no_values_error(lacking)
        return f"sha256:{data['digest']}"

    def pull(
        self,
        ref: str,
        path: str | os.PathLike[str],
        *,
        target: Any = None,
        progress: Progress | None = None,
        **policy: Any,
    ) -> Path:
        """Save ``ref`` to a safetensors file, fitted to ``target`` if one is given.

        The body streams to a unique ``.incomplete`` file beside ``path`` (after a free-space
        check) and is renamed into place only when every byte arrived, so ``path`` never
        holds a partial file. An interrupted transfer resumes with ``Range``.

        With a target the file is the fetch stream: its ``__metadata__`` carries the plan
        (``statehub.plan``) and the keys the target keeps (``statehub.keep_target``), which
        the file does not contain. Without one it is the stored checkpoint, byte for byte,
        checked against its digest.

        Args:
            ref: a version reference.
            path: where to write.
            target: as for :meth:`plan`, or None for the stored checkpoint as it is.
            progress: called with ``(bytes_received, bytes_total)``.
            **policy: as for :meth:`fetch` (only with a target).

        Returns:
            ``path`` as a :class:`~pathlib.Path`.

        Raises:
            Incompatible, NotFound, ConnectionFailed, IntegrityError; OSError (ENOSPC) when
            the disk cannot hold the file.
        """
        model, version = split_ref(ref)
        base = f"/v1/models/{model}/versions/{version}"
        if target is None:
            if policy:
                raise TypeError("policy options need a target; without one pull stores as is")
            key = Cache.key("pull", self.url, model, version)
            stream = self._open_body(key, "pull", ref, "GET", f"{base}/blob", None)
        else:
            body = _fit_body(target, policy)
            key = Cache.key("fetch", self.url, model, version, body)
            stream = self._open_body(key, "fetch", ref, "POST", f"{base}/fetch", body)
        return _download(stream, Path(path), progress, verify_digest=target is None)

    def _open_body(
        self,
        key: str,
        kind: str,
        ref: str,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        plan_first: Callable[[], str] | None = None,
    ) -> _Body:
        """The body of a fetch or pull, opened: from the cache when the server says the
        cached one is current (``304``) or when offline, else from the server, kept in the
        cache as it arrives. ``plan_first`` (the path to fetch once planned) runs before a
        body is received; a 304 needs no plan, as no weight moves."""
        cached = self.cache.lookup(key) if self.cache is not None else None
        if self.offline:
            if cached is None:
                raise NotCached(
                    f"{ref} (this {kind}) is not in the cache at {self.cache and self.cache.root} "
                    "and STATEHUB_OFFLINE is set: fetch it once online"
                )
            return _CachedBody(cached)
        if cached is not None:
            stream = _ResumableBody(self, method, path, body, if_none_match=cached.etag)
            try:
                stream.open()
            except BaseException:
                cached.close()
                raise
            if stream.not_modified:
                return _CachedBody(cached)
            cached.close()
            if plan_first is None:
                return self._receiving(stream, key, kind, ref)
            stream.close()  # the body changed: plan it before a weight moves
        if plan_first is not None:
            path = plan_first()
        stream = _ResumableBody(self, method, path, body)
        stream.open()
        return self._receiving(stream, key, kind, ref)

    def _receiving(self, stream: _ResumableBody, key: str, kind: str, ref: str) -> _Body:
        """``stream``, kept in the cache as it arrives where the cache can hold it."""
        if self.cache is not None and self.cache.can_hold(stream.total):
            stream.receiver = self.cache.receive(key, kind=kind, ref=ref)
        return stream

    def _fetch_stream(
        self, stream: _Body, progress: Progress | None, sink: TensorSink
    ) -> dict[str, str]:
        """The fetch body into ``sink`` tensor by tensor; its length and (where announced)
        digest checked, and kept in the cache if it is being received. Returns the
        header's metadata."""
        hasher = _BackgroundSha256()
        receiver = stream.receiver
        try:
            try:
                stream.open()
                chunks = stream.chunks(progress)
                if stream.body_digest or receiver:  # to check it, or to name it in the cache
                    chunks = hasher.wrap(chunks)
                if receiver is not None:
                    chunks = receiver.wrap(chunks)
                reader = StreamReader(chunks)
                try:
                    metadata = read_into(reader, sink)
                except EOFError as exc:
                    raise IntegrityError(f"the fetch stream ended early: {exc}") from exc
            finally:
                stream.close()
                hasher.close()
            if reader.consumed != stream.total:
                raise IntegrityError(
                    f"read {reader.consumed} bytes of a {stream.total}-byte fetch response"
                )
            if stream.body_digest:
                _check_digest(stream, hasher.hexdigest())
            if receiver is not None:
                receiver.commit(digest=hasher.hexdigest(), etag=stream.etag, size=stream.total)
        finally:
            if receiver is not None:
                receiver.close()  # what was not committed
        return metadata

    @staticmethod
    def _complete(
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, str],
        target: Any,
        device: torch.device | None,
    ) -> dict[str, torch.Tensor]:
        """Fill keep_target keys from the target and tied keys from their canonical key,
        in the target's key order."""
        keep = json.loads(metadata.get("statehub.keep_target", "[]"))
        tied = json.loads(metadata.get("statehub.tied", "{}"))
        if keep:
            valueless = valueless_keys(target)
            lacking = [key for key in keep if key in valueless]
            if lacking:  # planned as fillable, yet the fetch's own plan keeps these
                raise no_values_error(lacking)
            own = state_dict_of(target)
            for key in keep:
                value = own[key].detach()
                tensors[key] = value if device is None else value.to(device)
        for key, canonical in tied.items():
            tensors[key] = tensors[canonical]
        order = [t["key"] for t in spec_of(target)["tensors"]]
        known = set(order)
        return {k: tensors[k] for k in order if k in tensors} | {
            k: v for k, v in tensors.items() if k not in known
        }


def _warn_if_partial(
    ref: str, metadata: dict[str, str], result: FetchedStateDict, *, explicit: bool
) -> None:
    """A StatehubWarning naming the target keys the fetch kept and the checkpoint tensors
    it did not use: a strict load of such a result succeeds with the model's own values
    for those keys, which is a silent wrong load unless it was meant."""
    keep = json.loads(metadata.get("statehub.keep_target", "[]"))
    if not keep or explicit:
        return
    unused = result.plan.unused if result.plan is not None else []
    message = (
        f"fetch of {ref} kept {len(keep)} key(s) of the target with the model's own values "
        f"(not in the checkpoint, or reset by the policy): {_names(keep)}"
    )
    if unused:
        message += f"; checkpoint tensors not used: {_names(unused)}"
        message += " (a rename no stage knows? register an adapter)"
    message += '. Pass on_missing="keep" to say this is meant, or on_missing="error" to refuse.'
    warnings.warn(message, StatehubWarning, stacklevel=3)


def _names(keys: list[str], shown: int = 8) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


class _BackgroundSha256:
    """sha256 of the chunks passed through ``wrap``, computed on a thread of its own.

    hashlib releases the GIL on large buffers, so verifying a body overlaps receiving and
    parsing it instead of adding a pass after each chunk. Chunks (``bytes``) go
    to the thread in batches of about ``BATCH`` bytes: a queue hand-off per 64 KiB chunk
    costs more than it saves. At most ``QUEUED`` batches wait, so memory stays bounded.
    """

    BATCH = 1024 * 1024
    QUEUED = 16

    def __init__(self) -> None:
        self._hasher = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=self.QUEUED)
        self._batch: list[Chunk] = []
        self._batched = 0
        self._thread = threading.Thread(target=self._run, name="statehub-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            self._hasher.update(batch)

    def wrap(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        for chunk in chunks:
            self._batch.append(chunk)
            self._batched += len(chunk)
            if self._batched >= self.BATCH:
                self._flush()
            yield chunk

    def _flush(self) -> None:
        if self._batch:
            # One update per batch: each update takes the GIL back from the reader.
            self._queue.put(b"".join(self._batch))
            self._batch, self._batched = [], 0

    def hexdigest(self) -> str:
        """The digest of every chunk ``wrap`` yielded (a reader may stop before its end)."""
        self.close()
        return self._hasher.hexdigest()

    def close(self) -> None:
        if self._thread.is_alive():
            self._flush()
            self._queue.put(None)
            self._thread.join()


def _items_to_push(obj: Any) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a module or state_dict to write, tied keys once; a tensor on ``meta``
    (no values) is refused before any request."""
    state_dict = state_dict_of(obj)
    on_meta = [key for key, t in state_dict.items() if t.device.type == "meta"]
    if on_meta:
        raise ValueError(
            f"{len(on_meta)} tensor(s) to push are on the meta device and have no values "
            f"(e.g. {on_meta[:3]}): load or initialize the weights first"
        )
    return dedupe_tied(state_dict)


def _check_loadable(target: Any, *, assign: bool, device: torch.device | None) -> None:
    """What ``load=True`` needs, checked before any request."""
    if not isinstance(target, torch.nn.Module):
        raise TypeError("load=True needs the target nn.Module")
    if assign:
        return
    own = target.state_dict(keep_vars=True)
    on_meta = [key for key, t in own.items() if t.device.type == "meta"]
    if on_meta:
        raise ValueError(
            f"{len(on_meta)} tensor(s) of the target are on the meta device (e.g. "
            f"{on_meta[0]!r}), which holds no values to copy into: pass assign=True"
        )
    if device is not None:
        elsewhere = [key for key, t in own.items() if not _is_on(t, device)]
        if elsewhere:
            raise ValueError(
                f"{len(elsewhere)} tensor(s) of the target are not on {device} (e.g. "
                f"{elsewhere[0]!r} on {own[elsewhere[0]].device}); load=True copies into the "
                f"module's tensors where they are: move the model there first, or pass "
                f"assign=True to place the fetched tensors on {device}"
            )


def _is_on(tensor: torch.Tensor, device: torch.device) -> bool:
    """``cuda`` matches every GPU; ``cuda:1`` only that one."""
    return tensor.device.type == device.type and device.index in (None, tensor.device.index)


def _counted(
    chunks: Iterator[bytes | memoryview], total: int, progress: Progress | None
) -> Iterator[bytes]:
    """``chunks`` as bytes, reporting the running byte count to ``progress``.

    ``bytes()`` of a bytes chunk is the chunk itself; a view (a part of a tensor, at most
    ``STREAM_CHUNK``) is copied once, the copy h11 would otherwise make to frame it.
    """
    done = 0
    if progress is not None:
        progress(0, total)
    for chunk in chunks:
        yield bytes(chunk)
        done += len(chunk)
        if progress is not None:
            progress(done, total)


def _download(stream: _Body, path: Path, progress: Progress | None, *, verify_digest: bool) -> Path:
    """Write a response body to ``path`` atomically: ``.incomplete`` temp, then rename; and
    into the cache, if it is being received."""
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.incomplete")
    digest = _BackgroundSha256()
    receiver = stream.receiver
    written = 0
    try:
        stream.open()
        free = shutil.disk_usage(path.parent).free
        if stream.total > free:
            raise OSError(
                errno.ENOSPC,
                f"{path.parent} has {free} bytes free; the file needs {stream.total}",
            )
        chunks = stream.chunks(progress)
        if receiver is not None:
            chunks = receiver.wrap(chunks)
        with open(partial, "wb") as handle:
            for chunk in digest.wrap(chunks):
                handle.write(chunk)
                written += len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        if written != stream.total:
            raise IntegrityError(f"received {written} of {stream.total} bytes")
        actual = digest.hexdigest()
        if verify_digest or stream.body_digest:
            _check_digest(stream, actual)
        os.replace(partial, path)
        if receiver is not None:
            receiver.commit(digest=actual, etag=stream.etag, size=written)
    finally:
        stream.close()
        digest.close()
        partial.unlink(missing_ok=True)
        if receiver is not None:
            receiver.close()
    return path


def _check_digest(stream: _Body, actual: str) -> None:
    """The bytes arrived unchanged: their sha256 is the digest the server announced (the
    body's own, ``X-Statehub-Body-Digest``; from older servers the stored blob's)."""
    expected = stream.body_digest or stream.digest or stream.etag.strip('"')
    if not expected:
        raise IntegrityError("the server announced no digest to check the download against")
    if actual != expected:
        raise IntegrityError(
            f"the received bytes hash to sha256 {actual}, not the announced digest {expected}"
        )


class _ResumableBody:
    """A response body, resumed with ``Range`` + ``If-Range`` if the connection drops.

    A ``303`` (a presigned blob store URL, ``STATEHUB_PRESIGN_FETCH``) is followed here,
    never by httpx: the store gets no ``Authorization`` (the URL is its own credential), and
    the digest to check comes from statehub's headers on the 303. A resume asks the store
    for the rest, and statehub (which serves ranges itself) if the store refuses, e.g. once
    the URL expired.
    """

    def __init__(
        self,
        client: Client,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        resumes: int = 3,
        *,
        if_none_match: str | None = None,
    ) -> None:
        self._client = client
        self._if_none_match = if_none_match  # the cached body's ETag: a 304 says it is current
        self.not_modified = False
        self.receiver: Receiver | None = None  # the cache, keeping the body as it arrives
        self._method = method
        self._path = path
        self._body = body
        self._resumes = resumes
        self._response: httpx.Response | None = None
        self._announced: httpx.Headers = httpx.Headers()  # statehub's (the 303's) headers
        self._location = ""  # the presigned URL, once redirected
        self._store_etag = ""  # the store's own ETag of the object, for If-Range
        self.total = 0
        self.etag = ""
        self.digest = ""  # the stored blob's sha256, as the server announces it
        self.mode = ""  # X-Statehub-Fetch-Mode: passthrough, rewrite, transform, cached
        self.passthrough = False  # the body is the stored blob, byte for byte
        self.body_digest = ""  # the sha256 of the whole body, when it is known beforehand

    def _request(self, received: int) -> httpx.Response:
        if received and self._location:
            from_store = self._store_get(received)
            if from_store.status_code == 206:
                return from_store
            from_store.close()  # expired or changed: statehub serves the range itself
        # Every body announced with a digest is checked here: the server need not check it
        # a second time while it streams (service.integrity).
        headers = {"X-Statehub-Client-Verifies": "sha256"}
        if received:
            headers |= {"Range": f"bytes={received}-", "If-Range": self.etag}
        elif self._if_none_match:
            headers["If-None-Match"] = self._if_none_match
        http = self._client._http
        response = self._client._send(
            lambda: http.build_request(
                self._method,
                self._path,
                json=self._body,
                headers=headers,
                timeout=httpx.Timeout(http.timeout.read, connect=10.0),
            ),
            retry=True,
        )
        if not received:
            self._announced = response.headers
        if response.status_code == 303:
            response = self._follow(response, received)
        if received and response.status_code != 206:
            response.close()
            raise IntegrityError("the content changed while resuming; fetch again")
        return response

    def _follow(self, redirect: httpx.Response, received: int) -> httpx.Response:
        redirect.close()
        location = redirect.headers.get("location", "")
        if not location:
            raise StatehubError("the server answered 303 without a Location", response=redirect)
        self._location = str(redirect.url.join(location))
        response = self._store_get(received)
        if response.status_code >= 400:
            response.read()
            response.close()
            raise StorageError(
                f"the blob store answered {response.status_code} to the presigned URL",
                response=response,
            )
        return response

    def _store_request(self, received: int) -> httpx.Request:
        """A GET of the presigned URL built from scratch: the client's default headers (its
        bearer token) are never merged in, whatever host the URL names."""
        http = self._client._http
        headers = {"User-Agent": http.headers.get("user-agent", "statehub-client")}
        if received:
            headers["Range"] = f"bytes={received}-"
            if self._store_etag:
                headers["If-Range"] = self._store_etag
        timeout = httpx.Timeout(http.timeout.read, connect=10.0)
        return httpx.Request(
            "GET", self._location, headers=headers, extensions={"timeout": timeout.as_dict()}
        )

    def _store_get(self, received: int) -> httpx.Response:
        try:
            return self._client._http.send(self._store_request(received), stream=True)
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"cannot reach the blob store: {exc}") from exc

    def open(self) -> None:
        """Send the request; afterwards ``total``, ``etag`` and the digests are known, or
        ``not_modified`` is set (the cached body is current; there is no body)."""
        if self._response is not None:
            return
        self._response = self._request(0)
        if self._response.status_code == 304:
            self.not_modified = True
            self._response.close()
            return
        self.total = int(self._response.headers["content-length"])
        if self._location:
            self._store_etag = self._response.headers.get("etag", "")
        headers = self._announced
        self.etag = headers.get("etag", "")
        self.digest = headers.get("x-statehub-digest", "")
        self.mode = headers.get("x-statehub-fetch-mode", "")
        self.passthrough = self.mode == "passthrough"
        # Older servers announce no body digest; a passthrough body is the stored blob.
        self.body_digest = headers.get("x-statehub-body-digest", "") or (
            self.digest if self.passthrough else ""
        )

    def chunks(self, progress: Progress | None = None) -> Iterator[Chunk]:
        """The body's bytes, in order, across as many resumed requests as it takes."""
        self.open()
        assert self._response is not None
        received = 0
        resumes = self._resumes
        if progress is not None:
            progress(0, self.total)
        while True:
            try:
                # No chunk_size: httpx would buffer up to it, and a cut would lose the buffer.
                for chunk in self._response.iter_raw():
                    received += len(chunk)
                    if progress is not None:
                        progress(received, self.total)  # before the yield: the reader may stop
                    yield chunk
            except httpx.TransportError as exc:
                if resumes == 0:
                    raise ConnectionFailed(
                        f"the transfer broke after {received} of {self.total} bytes: {exc}"
                    ) from exc
            self._response.close()
            if received >= self.total or resumes == 0:
                return
            resumes -= 1
            self._response = self._request(received)

    def close(self) -> None:
        if self._response is not None:
            self._response.close()


class _CachedBody:
    """A body from the cache, with the reading surface of :class:`_ResumableBody`: its
    digest was checked when it was stored (or, changed since, when it was looked up), so
    it is read memory-mapped without hashing it again."""

    CHUNK = 16 * 1024 * 1024

    def __init__(self, cached: CachedBody) -> None:
        self._cached = cached
        self.total = cached.size
        self.etag = cached.etag
        self.digest = cached.digest
        self.body_digest = ""  # checked already
        self.receiver: Receiver | None = None

    def open(self) -> None:
        pass

    def chunks(self, progress: Progress | None = None) -> Iterator[Chunk]:
        if self.total == 0:
            return
        # The views keep the map alive; it closes when the last one is released.
        view = memoryview(mmap.mmap(self._cached.handle.fileno(), 0, access=mmap.ACCESS_READ))
        for start in range(0, self.total, self.CHUNK):
            if progress is not None:
                progress(start, self.total)
            yield view[start : start + self.CHUNK]
        if progress is not None:
            progress(self.total, self.total)

    def load(
        self, device: torch.device | None, progress: Progress | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and ``__metadata__``, as safetensors loads a file: on the CPU the
        tensors map the cached file (its pages are read as they are used; an eviction
        meanwhile unlinks the file, the mapping stays), elsewhere copied to ``device``."""
        try:
            with safe_open(
                self._cached.handle.name, framework="pt", device=str(device or "cpu")
            ) as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        except FileNotFoundError:  # evicted between lookup and load: read the open handle
            sink = DictSink(device)
            metadata = read_into(StreamReader(self.chunks()), sink)
            tensors = sink.tensors
        finally:
            self.close()
        if progress is not None:
            progress(self.total, self.total)
        return tensors, metadata

    def close(self) -> None:
        self._cached.close()


_Body = _ResumableBody | _CachedBody
