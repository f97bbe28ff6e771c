"""Alembic owns the schema: upgrade, downgrade and upgrade again on SQLite and PostgreSQL,
and the models never drift from the migrations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service.storage import db
from service.storage.models import Base
from tests._server import create_pg_schema, drop_pg_schema

TABLES = {
    "models",
    "versions",
    "aliases",
    "adapters",
    "audit_events",
    "tokens",
    "blob_leases",
    "stored_tensors",
    "blob_refs",
    "fit_cache",
    "version_files",
    "composed_files",
    "composed_file_parts",
    "alembic_version",
}


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    schema, url = create_pg_schema()
    try:
        yield url
    finally:
        drop_pg_schema(schema)


def tables(url: str) -> set[str]:
    engine = db.make_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    assert tables(database_url) == set()
    db.upgrade(database_url)
    assert tables(database_url) == TABLES
    db.downgrade(database_url, "base")
    assert tables(database_url) == {"alembic_version"}
    db.upgrade(database_url)
    assert tables(database_url) == TABLES


def test_models_match_migrations(database_url: str) -> None:
    db.upgrade(database_url)
    engine = db.make_engine(database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()
