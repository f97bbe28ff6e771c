"""All server configuration, in one pydantic-settings class (env prefix ``STATEHUB_``)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
GiB = 1024 * MiB


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STATEHUB_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("statehub-data")

    # Metadata database. Empty: an SQLite file under data_dir (the embedded default).
    database_url: str = ""
    # Apply pending alembic migrations at start; turn off where a migration job runs them.
    migrate_on_start: bool = True

    # Blob store. An S3 bucket when s3_bucket is set, otherwise a directory under data_dir.
    s3_endpoint: str = ""
    # The address clients reach the store at, where it is not s3_endpoint (a MinIO the
    # server reaches as http://minio:9000): presigned URLs (direct pushes, presigned
    # fetches) are signed for it. Empty: s3_endpoint.
    s3_public_endpoint: str = ""
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_region: str = "us-east-1"
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    s3_multipart_threshold: int = Field(default=64 * MiB, ge=5 * MiB)
    s3_multipart_chunk: int = Field(default=64 * MiB, ge=5 * MiB)
    # An S3 outage answers 503 within about attempts x (connect or read timeout + backoff),
    # not after minutes of retries. The read timeout is per socket read, not per object.
    s3_connect_timeout_s: float = Field(default=5.0, gt=0, le=300)
    s3_read_timeout_s: float = Field(default=20.0, gt=0, le=600)
    s3_max_attempts: int = Field(default=3, ge=1, le=10)

    # With an S3 store, clients upload checkpoints and folder files straight to the bucket
    # (presigned multipart parts under staging/), and the server checks and moves them into
    # place; off, or with a local store, every upload goes through the server. Off by
    # default: the server reads each upload back to check its sha256, so it moves as many
    # bytes as a push through it, and on a store next to the server (benchmarks/results/
    # push_direct.md) direct pushes are slower; turn it on where clients reach the store
    # faster than they reach the server.
    direct_push: bool = False
    direct_push_part_bytes: int = Field(default=16 * MiB, ge=5 * MiB, le=5 * GiB)

    # Where upload bodies are spooled while they are hashed and validated.
    spool_dir: Path | None = None
    # An upload is refused (503, retry later) when it would leave less free on the spool disk.
    spool_min_free_bytes: int = Field(default=256 * MiB, ge=0)

    # Bounds on what a request may ask of the server.
    max_upload_bytes: int = Field(default=64 * GiB, gt=0)
    # A version pushed as a folder: how many files, and their total size (each file is
    # bounded by max_upload_bytes).
    max_version_files: int = Field(default=1000, gt=0)
    max_version_bytes: int = Field(default=1024 * GiB, gt=0)
    max_header_bytes: int = Field(default=64 * MiB, gt=0)
    max_tensors: int = Field(default=200_000, gt=0)
    max_rank: int = Field(default=8, gt=0)
    max_dim: int = Field(default=2**40, gt=0)
    max_spec_bytes: int = Field(default=32 * MiB, gt=0)
    max_key_length: int = Field(default=1024, gt=0)
    # Largest tensor the server decodes to transform it during a fetch.
    max_transform_tensor_bytes: int = Field(default=8 * GiB, gt=0)
    # A fetch's tensor bytes are at most this multiple of the stored version's size, plus
    # 64 MiB: the target (a read token's choice) must not choose what the server builds and
    # sends. 8 lets every tensor be cast from a 1-byte to an 8-byte dtype.
    max_fetch_expansion: float = Field(default=8.0, ge=1.0)
    # Rule evaluations that applying adapters may cost a plan, per key (checkpoint and target
    # keys together; a real adapter takes 2-4). Renamed keys are also held to max_key_length
    # at every step.
    adapter_steps_per_key: int = Field(default=32, gt=0)

    # Size of the chunks streamed from the blob store to a response.
    stream_chunk_bytes: int = Field(default=8 * MiB, gt=0)
    # A fetch that rewrites or transforms tensors reads the stored bytes it needs as large
    # ranges: spans at most fetch_read_gap apart are read as one (the gap is dropped), cut
    # into parts of fetch_read_part bytes, up to fetch_reads_in_flight parts at once (so
    # about in_flight x part bytes are buffered per fetch). 4 x 8 MiB: with 4 x 16 MiB a
    # 384 MiB transforming fetch grew the server by 170-220 MiB (tests/api/test_fetch_memory).
    fetch_read_gap: int = Field(default=1 * MiB, ge=0, le=64 * MiB)
    fetch_read_part: int = Field(default=8 * MiB, ge=64 * 1024, le=256 * MiB)
    fetch_reads_in_flight: int = Field(default=4, ge=1, le=32)

    # Exact fetches and blob downloads answer 303 to a presigned URL of the stored blob
    # (S3 only), valid this long: the bytes then come straight from the store.
    presign_fetch: bool = False
    presign_expires_s: int = Field(default=900, ge=60, le=7 * 24 * 3600)
    # Fitted fetch bodies are kept as blobs keyed by ETag; the same fetch again is a
    # passthrough. gc evicts entries unused for fit_cache_ttl_s.
    fit_cache: bool = True
    fit_cache_ttl_s: int = Field(default=7 * 24 * 3600, ge=0)
    # A push stores its tensors one by one, as ranges of blobs already stored plus one blob
    # of new tensors, when at least this fraction of its bytes is stored already.
    dedup_min_shared_fraction: float = Field(default=0.5, ge=0.0, le=1.0)

    # The address clients use (https://statehub.example.com), shown in the UI's snippets;
    # empty: http://<host>:<port>. Never taken from a request's Host header.
    public_url: str = ""

    # Slow and half-open clients: a request's line and headers must arrive within
    # request_header_timeout_s and hold at most request_head_max_bytes; a body may pause at
    # most request_body_timeout_s and must average request_body_min_rate bytes per second
    # (each byte received buys 1/rate s, up to that timeout). Idle keep-alive connections
    # are closed after keep_alive_timeout_s.
    request_header_timeout_s: float = Field(default=10.0, gt=0, le=600)
    request_head_max_bytes: int = Field(default=64 * 1024, ge=4096, le=16 * MiB)
    request_body_timeout_s: float = Field(default=20.0, gt=0, le=3600)
    request_body_min_rate: int = Field(default=8 * 1024, ge=1)
    keep_alive_timeout_s: int = Field(default=5, ge=1, le=600)

    # Operations. Logs: one JSON object per line, or "text" for a terminal.
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["json", "text"] = "json"
    # On SIGTERM, in-flight requests (fetches) get this long to finish before being cut.
    shutdown_grace_seconds: int = Field(default=30, ge=0)

    # Access control (service.auth). "auto": tokens are enforced once one exists (or a
    # bootstrap token is set), else the server is open and serves loopback only; "tokens":
    # always enforced, and a first start without tokens logs a generated admin token once.
    auth: Literal["auto", "tokens"] = "auto"
    # An admin token (32+ random characters) created at start if it does not exist yet.
    bootstrap_token: SecretStr | None = None
    # Signs the upload URLs the Hugging Face Hub protocol hands out (LFS "basic" uploads
    # carry no token). Unset: a random key per process, so set it when replicas share work.
    hub_upload_secret: SecretStr | None = None
    # gc never collects blobs or temp files younger than this.
    gc_grace_s: int = Field(default=3600, ge=0)
    # How long an upload's claim on its blob protects it from gc (a crashed upload's expires).
    upload_lease_s: int = Field(default=24 * 3600, gt=0)
    # Stored blobs up to this size are read and verified (sha256) before a response starts;
    # larger ones are verified while streaming and the connection is cut on a mismatch.
    verify_buffer_bytes: int = Field(default=16 * MiB, ge=0)

    @field_validator("bootstrap_token")
    @classmethod
    def _strong_bootstrap_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        secret = value.get_secret_value()
        if len(secret) < 32 or len(set(secret)) < 10 or len(secret) > 200:
            raise ValueError(
                "STATEHUB_BOOTSTRAP_TOKEN must be 32-200 random characters, e.g. from "
                "python -c 'import secrets; print(\"shb_\" + secrets.token_urlsafe(32))'"
            )
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lowercase(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        web = parts.scheme in ("http", "https") and parts.netloc
        if value and (not web or parts.query or parts.fragment):
            raise ValueError("STATEHUB_PUBLIC_URL must look like https://statehub.example.com")
        return value

    @model_validator(mode="after")
    def _s3_needs_bucket(self) -> Settings:
        if self.s3_endpoint and not self.s3_bucket:
            raise ValueError("STATEHUB_S3_ENDPOINT is set but STATEHUB_S3_BUCKET is not")
        return self

    @cached_property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'statehub.db').resolve()}"

    @cached_property
    def effective_spool_dir(self) -> Path:
        return self.spool_dir or self.data_dir / "spool"

    @property
    def effective_public_url(self) -> str:
        if self.public_url:
            return self.public_url
        host = "localhost" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def uses_s3(self) -> bool:
        return bool(self.s3_bucket)
