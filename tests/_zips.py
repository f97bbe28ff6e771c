"""Rewriting torch zip checkpoints for the tests that damage them on purpose."""

from __future__ import annotations

import io
import zipfile
from typing import Any


def rebuild_zip(data: bytes, change: dict[str, bytes | None], **kwargs: Any) -> bytes:
    """The same torch zip with members replaced (None: removed), CRCs recomputed."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            suffix = next((s for s in change if info.filename.endswith(s)), None)
            content = source.read(info) if suffix is None else change[suffix]
            if content is not None:
                target.writestr(info.filename, content, **kwargs)
    return out.getvalue()
