"""Transformer scale: a Llama-shaped ``save_pretrained`` repository of ``--scale-gb`` GiB.

    python -m benchmarks.run --only scale --scale-gb 6 --scale-s3-gb 2

The repository: bf16, vocabulary 128,256, untied ``lm_head``, hidden up to 4096, three
safetensors shards + ``model.safetensors.index.json`` + ``config.json`` (written shard by
shard with the key names and shapes of ``transformers``' ``LlamaForCausalLM``, random
weights, so memory stays at one shard). Measured on each backend (SQLite + local blobs at
``--scale-gb``; PostgreSQL + moto's S3 at ``--scale-s3-gb``, as moto keeps every object in
memory): the folder push (time, stored bytes), a plan, an ``exact`` fetch into a meta-built
model with ``load=True, assign=True``, a fetch cast to fp32 the same way, a head-only
fine-tune (new ``lm_head``) pushed as a state_dict and as a folder, the do-it-yourself road
(the shard files read whole: from the bucket with boto3 on S3, from disk on local; then
``safetensors`` and a strict ``load_state_dict(assign=True)``), the server's peak RSS growth
and the S3 requests of each fetch (moto's request log).

Every client operation runs in a fresh process (``python -m benchmarks.scale probe ...``), so
its peak RSS is its own; after the peak is read, every fetched tensor is compared with the
file's (all of them, value by value).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from benchmarks.harness import MiB, PeakGrowth, Report, Services, Stack, seconds, table, wait_idle

GiB = 1024 * MiB
VOCAB = 128_256
SHARDS = 3
INDEX = "model.safetensors.index.json"
MODEL = "scale/llama"
EXACT = "fetch exact, load+assign"
CAST = "fetch cast to fp32, load+assign"
CLIENT_LIMIT = 1.1  # client peak growth / result bytes, load=True
SERVER_LIMIT_MIB = 150.0
FINETUNE_LIMIT = 1.05  # stored bytes growth / new bytes
# Fitted bodies would be cached as blobs (a 2x body for the cast): off, so storage counts
# only what pushes store and the cast is computed, as a first fetch is.
SERVER_SETTINGS = {"fit_cache": "false"}


# -- the repository ---------------------------------------------------------------------


def llama_config(size_bytes: int) -> Any:
    """A LlamaConfig whose bf16 weights are about ``size_bytes``: the widest hidden size (up
    to 4096, Llama 3 8B's) that still leaves room for eight layers, at most 32 layers."""
    from transformers import LlamaConfig

    for hidden in [*range(4096, 127, -128), 64]:
        shape = _llama_shape(hidden)
        layers = round((size_bytes - 2 * (2 * VOCAB * hidden + hidden)) / shape["per_layer"])
        if layers >= 8 or hidden == 64:
            break
    heads = shape["heads"]
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=shape["intermediate"],
        num_hidden_layers=max(2, min(32, layers)),
        num_attention_heads=heads,
        num_key_value_heads=shape["kv_heads"],
        head_dim=hidden // heads,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def _llama_shape(hidden: int) -> dict[str, int]:
    """Heads of 128 (grouped-query: a quarter as many key/value heads), MLP 3.5x wide, and
    the bf16 bytes of one decoder layer."""
    heads = max(1, hidden // 128)
    kv_heads = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= max(1, heads // 4))
    intermediate = round(3.5 * hidden / 128) * 128
    kv = kv_heads * (hidden // heads)
    per_layer = 2 * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate + 2 * hidden)
    return {
        "heads": heads,
        "kv_heads": kv_heads,
        "intermediate": intermediate,
        "per_layer": per_layer,
    }


def meta_model(folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """``LlamaForCausalLM`` of the folder's config.json, built on ``meta`` (no memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return model.to(dtype=dtype)  # type: ignore[call-arg]


@dataclass
class Repo:
    folder: Path
    shards: list[str]
    weight_map: dict[str, str]
    tensors: int
    weight_bytes: int
    head_bytes: int  # lm_head.weight: what a head-only fine-tune changes


def write_repo(folder: Path, size_bytes: int, seed: int) -> Repo:
    """config.json, generation_config.json, a README and three shards + index, as
    ``save_pretrained(max_shard_size=...)`` lays them out; one shard in memory at a time."""
    from transformers import GenerationConfig

    config = llama_config(size_bytes)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(folder)  # type: ignore[no-untyped-call]
    (folder / "README.md").write_text("# scale benchmark\n\nRandom weights, Llama-shaped.\n")
    specs = [
        (k, tuple(t.shape)) for k, t in meta_model(folder, torch.bfloat16).state_dict().items()
    ]
    total = sum(2 * _numel(shape) for _, shape in specs)
    generator = torch.Generator().manual_seed(seed)
    limit = total / SHARDS
    while len(groups := _shard_groups(specs, limit)) > SHARDS:
        limit *= 1.05  # the smallest max_shard_size that makes three shards
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map: dict[str, str] = {}
    for name, group in zip(names, groups, strict=True):
        shard = {key: _random(shape, generator) for key, shape in group}
        _save_shard(shard, folder / name)
        weight_map |= dict.fromkeys(shard, name)
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    head = dict(specs)["lm_head.weight"]
    return Repo(folder, names, weight_map, len(specs), total, 2 * _numel(head))


def _shard_groups(
    specs: list[tuple[str, tuple[int, ...]]], limit: float
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """``save_pretrained``'s split: in key order, a new shard when the next tensor would
    take this one over ``limit`` bytes."""
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for key, shape in specs:
        size = 2 * _numel(shape)
        if groups[-1] and filled + size > limit:
            groups.append([])
            filled = 0
        groups[-1].append((key, shape))
        filled += size
    return groups


def write_finetune(repo: Repo, folder: Path, seed: int) -> Path:
    """The repository with a new ``lm_head``: unchanged files hard-linked, the head's shard
    rewritten (as ``save_pretrained`` of the fine-tuned model would)."""
    from safetensors.torch import load_file

    folder.mkdir(parents=True)
    changed = repo.weight_map["lm_head.weight"]
    for path in repo.folder.iterdir():
        if path.name != changed:
            os.link(path, folder / path.name)
    shard = load_file(repo.folder / changed)
    shard["lm_head.weight"] = new_head(shard["lm_head.weight"].shape, seed)
    _save_shard(shard, folder / changed)
    return folder


def new_head(shape: torch.Size | tuple[int, ...], seed: int) -> torch.Tensor:
    return _random(tuple(shape), torch.Generator().manual_seed(seed))


def _random(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.bfloat16)


def _save_shard(shard: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(shard, str(path), metadata={"format": "pt"})


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- backends ---------------------------------------------------------------------------


@dataclass
class Backend:
    """A server over one registry, what it stores, and (S3) the requests it makes."""

    name: str
    size_gib: float
    url: str
    pid: int
    stored_bytes: Callable[[], int]
    s3: dict[str, str] | None = None  # endpoint, bucket, keys: for the DIY road
    request_count: Callable[[], int] | None = None
    busy_pids: tuple[int, ...] = ()


@contextmanager
def local_backend(services: Services, size_gib: float) -> Iterator[Backend]:
    from tests._server import start_server

    data_dir = Path(services.stack().data_dir)
    env = {"STATEHUB_DATA_DIR": str(data_dir)}
    env |= {f"STATEHUB_{k.upper()}": v for k, v in SERVER_SETTINGS.items()}
    server = start_server(env)
    try:
        yield Backend(
            "SQLite + local",
            size_gib,
            server.url,
            server.pid,
            lambda: _tree_bytes(data_dir / "blobs"),
            busy_pids=(server.pid,),
        )
    finally:
        server.stop()


@contextmanager
def s3_backend(services: Services, size_gib: float) -> Iterator[Backend]:
    from tests._server import create_pg_schema, drop_pg_schema
    from tests._services import S3_TEST_KEYS

    stack: Stack = services.stack()
    schema, url = create_pg_schema()
    log = MotoLog(services, stack.bucket)
    try:
        with stack.server(database_url=url, **SERVER_SETTINGS) as server:
            yield Backend(
                "PostgreSQL + S3 (moto)",
                size_gib,
                server.url,
                server.pid,
                stack.stored_bytes,
                {"endpoint": stack.endpoint, "bucket": stack.bucket, **S3_TEST_KEYS},
                log.count,
                stack.busy_pids,
            )
    finally:
        drop_pg_schema(schema)
        log.close()


class MotoLog:
    """The requests for one bucket in moto's request log (one line per request), read
    through a file description of its own so moto's writing offset is not moved."""

    def __init__(self, services: Services, bucket: str) -> None:
        log = services.moto.log
        log.flush()
        self._fd = os.open(f"/proc/self/fd/{log.fileno()}", os.O_RDONLY)
        self._line = re.compile(
            rb'"(?:\x1b\[[0-9;]*m)*[A-Z]+ /' + re.escape(bucket.encode()) + rb"[/?]"
        )

    def count(self) -> int:
        time.sleep(0.3)  # moto writes the line after it answers
        size = os.fstat(self._fd).st_size
        return len(self._line.findall(os.pread(self._fd, size, 0)))

    def close(self) -> None:
        os.close(self._fd)


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


# -- client operations, each in a process of its own ------------------------------------


def probe(args: dict[str, Any]) -> dict[str, Any]:
    """Run one client operation in a fresh process; returns its JSON answer."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.scale", "probe", json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"probe {args['mode']} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}"
        )
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def _rss_kib() -> int:
    from benchmarks.harness import proc_status_kib

    return proc_status_kib(os.getpid(), "VmRSS")


def _hwm_kib() -> int:
    from benchmarks.harness import proc_status_kib

    return proc_status_kib(os.getpid(), "VmHWM")


def run_probe(args: dict[str, Any]) -> dict[str, Any]:
    """In the probe process: the operation ``args["mode"]``, timed, with its peak RSS above
    the RSS after the imports and the meta-built model; then the equality check."""
    from statehub import Client

    mode, folder = args["mode"], Path(args["folder"])
    dtype = torch.float32 if mode == "cast" else torch.bfloat16
    model = meta_model(folder, dtype) if mode != "finetune" else None
    if mode == "finetune":  # the base weights, read before the baseline: only the push counts
        from safetensors.torch import load_file

        index = json.loads((folder / INDEX).read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index.values())):
            state |= load_file(folder / shard)
        state["lm_head.weight"] = new_head(state["lm_head.weight"].shape, args["seed"])
    Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
    baseline = _rss_kib()
    answer: dict[str, Any] = {}
    with Client(args["url"], timeout=600, cache=False) as hub:
        started = time.perf_counter()
        if mode in ("exact", "cast"):
            assert model is not None
            hub.fetch(args["ref"], target=model, load=True, assign=True)
        elif mode == "finetune":
            version = hub.push(args["name"], state)
            answer["version"] = version.ref
        elif mode == "diy":
            assert model is not None
            diy_load(model, folder, args.get("s3"), args.get("keys"))
        else:
            raise ValueError(mode)
        answer["seconds"] = time.perf_counter() - started
    answer["peak_kib"] = _hwm_kib() - baseline
    if model is not None:
        result = model.state_dict()
        answer["result_bytes"] = sum(t.numel() * t.element_size() for t in result.values())
        answer["checked"] = check_all(result, folder, dtype)
    return answer


def diy_load(
    model: torch.nn.Module, folder: Path, s3: dict[str, str] | None, keys: dict[str, str] | None
) -> None:
    """Do-it-yourself: every shard file read whole (boto3 ``get_object`` from the bucket, or
    from disk), ``safetensors`` parses it, then one strict ``load_state_dict(assign=True)``."""
    from safetensors.torch import load

    shards = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    if s3 is None:
        for shard in shards:
            state |= load((folder / shard).read_bytes())
    else:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=s3["endpoint"],
            region_name="us-east-1",
            aws_access_key_id=s3["s3_access_key_id"],
            aws_secret_access_key=s3["s3_secret_access_key"],
        )
        assert keys is not None
        for shard in shards:
            body = client.get_object(Bucket=s3["bucket"], Key=keys[shard])["Body"].read()
            state |= load(body)
            del body
    model.load_state_dict(state, strict=True, assign=True)


def check_all(result: dict[str, torch.Tensor], folder: Path, dtype: torch.dtype) -> int:
    """Every tensor of ``result`` equals the file's (cast to ``dtype``); returns how many."""
    from safetensors import safe_open

    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    if set(weight_map) != set(result):
        raise AssertionError(f"keys differ: {sorted(set(weight_map) ^ set(result))[:5]}")
    checked = 0
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(folder / shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                want = handle.get_tensor(key).to(dtype)
                got = result[key]
                if got.dtype != dtype or got.shape != want.shape or not torch.equal(got, want):
                    raise AssertionError(f"{key}: the fetched tensor differs from the file's")
                checked += 1
    return checked


# -- the measurements -------------------------------------------------------------------


@dataclass
class Row:
    backend: str
    operation: str
    seconds: float
    server_mib: float
    client_mib: float | None = None
    result_bytes: int | None = None
    stored_growth: int | None = None
    new_bytes: int | None = None
    s3_requests: int | None = None
    note: str = ""


@dataclass
class BackendResult:
    backend: str
    size_gib: float
    repo: Repo
    config: str
    rows: list[Row] = field(default_factory=list)
    diy_seconds: float = float("nan")
    skipped: list[str] = field(default_factory=list)


def measure(backend: Backend, repo: Repo, finetune: Path, *, seed: int) -> BackendResult:
    cfg = json.loads((repo.folder / "config.json").read_text())
    config = (
        f"hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, intermediate "
        f"{cfg['intermediate_size']}, vocab {cfg['vocab_size']}, {repo.tensors} tensors, "
        f"{len(repo.shards)} shards, {repo.weight_bytes / GiB:.2f} GiB bf16"
    )
    out = BackendResult(backend.name, backend.size_gib, repo, config)
    name = f"{MODEL}-{uuid_hex()}"

    def step(operation: str, fn: Callable[[], Any], **row: Any) -> tuple[Row, Any]:
        wait_idle(*backend.busy_pids, timeout=120)
        stored, requests = backend.stored_bytes(), _count(backend)
        with PeakGrowth(backend.pid) as growth:
            elapsed, answer = seconds(fn)
        made = _count(backend)
        result = Row(backend.name, operation, elapsed, growth.mib, **row)
        result.stored_growth = backend.stored_bytes() - stored
        if requests is not None and made is not None:
            result.s3_requests = made - requests
        out.rows.append(result)
        print(f"  {backend.name}: {operation}: {elapsed:.1f} s", flush=True)
        return result, answer

    from statehub import Client

    with Client(backend.url, timeout=600, cache=False) as hub:
        row, version = step("push folder", lambda: hub.push(name, repo.folder))
        row.new_bytes = _tree_bytes(repo.folder)
        ref = version.ref
        files = {f["path"]: f["sha256"] for f in hub.files(ref)}
        target = meta_model(repo.folder, torch.bfloat16)
        row, plan = step("plan (meta bf16 target)", lambda: hub.plan(ref, target=target))
        row.note = f"verdict {plan.verdict}"

    base = {"url": backend.url, "ref": ref, "folder": str(repo.folder)}
    for mode, label in (("exact", EXACT), ("cast", CAST)):
        needed = (2 if mode == "cast" else 1) * repo.weight_bytes + 3 * GiB
        free = psutil.virtual_memory().available
        if free < needed:  # the machine is shared: a fetch that cannot fit is not run
            out.skipped.append(f"{label}: {free / GiB:.1f} GiB free, {needed / GiB:.1f} needed")
            continue
        args = {**base, "mode": mode}
        row, answer = step(label, lambda args=args: probe(args))  # type: ignore[misc]
        _fill(row, answer)
    keys = {s: f"blobs/sha256/{files[s][:2]}/{files[s]}" for s in repo.shards}
    diy_args = {**base, "mode": "diy", "s3": backend.s3, "keys": keys}
    where = "boto3 get_object" if backend.s3 else "read from disk"
    row, answer = step(f"DIY: {where} + safetensors + strict load", lambda: probe(diy_args))
    _fill(row, answer)
    row.server_mib = float("nan")  # the server takes no part
    out.diy_seconds = row.seconds

    ft_args = {**base, "mode": "finetune", "name": name, "seed": seed + 1}
    row, answer = step("push head-only fine-tune (state_dict)", lambda: probe(ft_args))
    row.seconds, row.new_bytes = answer["seconds"], repo.head_bytes
    row.client_mib = answer["peak_kib"] / 1024
    row.note = f"{answer['version']}; client peak over the loaded state_dict"
    with Client(backend.url, timeout=600, cache=False) as hub:
        row, version = step("push head-only fine-tune (folder)", lambda: hub.push(name, finetune))
        row.new_bytes = repo.head_bytes
        changed = finetune / repo.weight_map["lm_head.weight"]
        row.note = f"{version.ref}; its head's shard is {changed.stat().st_size / MiB:,.0f} MiB"
    return out


def _fill(row: Row, answer: dict[str, Any]) -> None:
    row.seconds = answer["seconds"]  # the operation alone (not the probe's imports)
    row.client_mib = answer["peak_kib"] / 1024
    row.result_bytes = answer["result_bytes"]
    row.note = f"{answer['checked']} tensors equal to the files'"


def _count(backend: Backend) -> int | None:
    return backend.request_count() if backend.request_count else None


def uuid_hex() -> str:
    import uuid

    return uuid.uuid4().hex[:6]


def run(services: Services, sizes: dict[str, float], seed: int = 13) -> Report:
    """Each backend at its size (GiB; 0 skips it); returns the report."""
    results = []
    failures: list[str] = []
    backends = {"local": local_backend, "s3": s3_backend}
    for which, size_gib in sizes.items():
        if size_gib <= 0:
            continue
        folder = services.scratch / f"scale-{which}"
        print(f"  writing a {size_gib} GiB repository", flush=True)
        repo = write_repo(folder / "repo", int(size_gib * GiB), seed)
        # A head of its own (the state_dict fine-tune's is seed + 1): stored bytes then
        # measure what the folder push stores, not a head another push stored already.
        finetune = write_finetune(repo, folder / "finetune", seed + 2)
        try:
            with backends[which](services, size_gib) as backend:
                results.append(measure(backend, repo, finetune, seed=seed))
        except Exception as exc:  # the other backend's figures still count
            failures.append(f"{which} at {size_gib} GiB: {type(exc).__name__}: {exc}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return report(results, failures)


# -- the report -------------------------------------------------------------------------


def _meets(ok: bool) -> str:
    return "yes" if ok else "**no**"


def report(results: list[BackendResult], failures: list[str]) -> Report:
    out = Report("scale", "Transformer scale: a Llama-shaped sharded repository")
    out.add(
        "A `save_pretrained`-shaped folder (config.json, generation_config.json, README.md, "
        "three bf16 safetensors shards + index; `LlamaForCausalLM` key names and shapes, "
        "vocabulary 128,256, untied `lm_head`, random weights) pushed and fetched through a "
        "real server. Fetches load into a `LlamaForCausalLM` built on `meta` "
        "(`load=True, assign=True`), each in a fresh client process: `client peak MiB` is "
        "its VmHWM above its RSS after the imports and the meta model; then every fetched "
        "tensor is compared with the file's, value by value (`N tensors equal`). Server: "
        "VmHWM above its RSS just before each operation. Stored: bytes added to the blob "
        "store (local blob directory or the bucket). S3 requests: the bucket's lines in "
        "moto's request log during the operation. Each operation runs once (a 6 GiB fetch "
        "is long enough to time); the fit cache is off (a cast is computed, as on a first "
        "fetch, and its 2x body is not stored).",
        "How to read: a head-only fine-tune pushed as a folder sends the shard that holds "
        "`lm_head` as its new tensors and the server composes the shard from them and the "
        "tensors it stores (a composed file, byte-identical), so its stored bytes are the "
        "head's and the shard's header; pushed as a state_dict it is deduplicated tensor by "
        "tensor. The two fine-tunes have heads of their own. On moto, a ranged GET costs "
        "time in proportion to the whole object (an 8 MiB range of a 512 MiB object took "
        "0.30 s, of a 64 MiB object 0.056 s, here): "
        "statehub reads a shard blob in 8 MiB parts (`fetch_read_part`) where the "
        "do-it-yourself road GETs each shard once, so the S3 timings of statehub's fetches "
        "measure moto more than statehub; the request counts are what a real bucket would "
        "see.",
    )
    for res in results:
        out.add(f"## {res.backend}, {res.size_gib:g} GiB", f"Repository: {res.config}.")
        rows = []
        for r in res.rows:
            rows.append(
                (
                    r.operation,
                    r.seconds,
                    _ratio(res.diy_seconds, r) if r.result_bytes else "",
                    r.server_mib,
                    "" if r.client_mib is None else r.client_mib,
                    "" if r.result_bytes is None else r.result_bytes / MiB,
                    "" if r.stored_growth is None else r.stored_growth / MiB,
                    "" if r.s3_requests is None else r.s3_requests,
                    r.note,
                )
            )
        headers = (
            "operation",
            "seconds",
            "DIY s / this s",
            "server peak +MiB",
            "client peak +MiB",
            "result MiB",
            "stored +MiB",
            "S3 requests",
            "note",
        )
        out.add(table(headers, rows), goals_table(res))
        if res.skipped:
            out.add("Not run (memory): " + "; ".join(res.skipped) + ".")
    out.fail(failures)
    return out


def _ratio(diy: float, row: Row) -> float | str:
    return diy / row.seconds if row.operation == EXACT else ""


def goals_table(res: BackendResult) -> str:
    by = {r.operation: r for r in res.rows}
    lines = []
    for r in (by[op] for op in (EXACT, CAST) if op in by):
        assert r.client_mib is not None and r.result_bytes
        ratio = r.client_mib * MiB / r.result_bytes
        lines.append(
            (
                f"client peak / result, {r.operation}",
                f"{ratio:.3f}",
                f"<= {CLIENT_LIMIT}",
                _meets(ratio <= CLIENT_LIMIT),
            )
        )
    for op in ("push head-only fine-tune (state_dict)", "push head-only fine-tune (folder)"):
        r = by[op]
        assert r.stored_growth is not None and r.new_bytes
        ratio = r.stored_growth / r.new_bytes
        lines.append(
            (
                f"stored / new bytes, {op}",
                f"{ratio:.3f}",
                f"<= {FINETUNE_LIMIT}",
                _meets(ratio <= FINETUNE_LIMIT),
            )
        )
    for r in res.rows:
        if r.server_mib == r.server_mib:  # not NaN: the server took part
            ok = r.server_mib < SERVER_LIMIT_MIB
            lines.append(
                (
                    f"server peak growth, {r.operation}",
                    f"{r.server_mib:,.1f} MiB",
                    f"< {SERVER_LIMIT_MIB:.0f} MiB",
                    _meets(ok),
                )
            )
    ratio = res.diy_seconds / by[EXACT].seconds if EXACT in by else float("nan")
    lines.append(("time, exact fetch against DIY (DIY s / statehub s)", f"{ratio:.2f}", "-", "-"))
    return table(("goal", "figure", "target", "meets"), lines)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "probe":
        print(json.dumps(run_probe(json.loads(argv[1]))), flush=True)
        return 0
    raise SystemExit("run through `python -m benchmarks.run --only scale`")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
