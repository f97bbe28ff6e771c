"""Identical pushes at the same moment make one version (issue 17 item 9).

20 threads push the same bytes to one model, over several trials, on both backends (a real
server process over HTTP): exactly one version of the digest exists afterwards, one answer
is 201 (created) and every other is 200 with that same version.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests._server import ServerProcess
from tests.api.conftest import checkpoint_bytes

PUSHERS = 20
TRIALS = 4


def push_together(url: str, body: bytes) -> list[httpx.Response]:
    """``PUSHERS`` uploads of ``body`` released at once (a barrier, then the POSTs)."""
    barrier = threading.Barrier(PUSHERS)

    def push(_: int) -> httpx.Response:
        with httpx.Client(timeout=120) as client:
            barrier.wait(30)
            return client.post(url, content=body)

    with ThreadPoolExecutor(PUSHERS) as pool:
        return list(pool.map(push, range(PUSHERS)))


def test_identical_concurrent_pushes_make_one_version(server: ServerProcess, ns: str) -> None:
    for trial in range(TRIALS):
        # A new model each trial (its creation is raced too), then the same bytes again on
        # the model that now exists: they must all answer with the version already there.
        model = f"{server.url}/v1/models/{ns}/same{trial}"
        body = checkpoint_bytes(900 + trial, rows=64, cols=64)
        for round_ in ("new model", "existing model"):
            answers = push_together(f"{model}/versions", body)
            statuses = sorted(r.status_code for r in answers)
            assert all(s in (200, 201) for s in statuses), [r.text for r in answers]
            created = statuses.count(201)
            assert created == (1 if round_ == "new model" else 0), (trial, round_, statuses)
            assert {r.json()["version"] for r in answers} == {1}, (trial, round_)
            assert len({r.json()["digest"] for r in answers}) == 1
        listed = httpx.get(f"{model}", timeout=30).json()
        numbers = [v["version"] for v in listed["versions"]]
        assert numbers == [1], (trial, listed)
        assert listed["latest_version"] == 1
