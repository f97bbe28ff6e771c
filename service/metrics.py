"""Process-wide counters, rendered in the Prometheus text format at ``/metrics``."""

from __future__ import annotations

import threading
from collections import defaultdict


class Counter:
    def __init__(self, name: str, help_text: str, label: str | None = None) -> None:
        self.name = name
        self.help_text = help_text
        self.label = label
        self._values: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, label_value: str = "", amount: float = 1) -> None:
        with self._lock:
            self._values[label_value] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items()) or [("", 0.0)]
        for value_label, value in items:
            labels = f'{{{self.label}="{value_label}"}}' if self.label and value_label else ""
            lines.append(f"{self.name}{labels} {value:g}")
        return lines


TENSORS_DECODED = Counter(
    "statehub_fetch_tensors_decoded_total", "Tensors decoded and transformed by fetches."
)
BYTES_FETCHED = Counter("statehub_fetch_bytes_total", "Bytes of fetch bodies sent.")
FETCHES = Counter("statehub_fetches_total", "Fetches by body layout.", label="mode")
PLAN_VERDICTS = Counter("statehub_plan_verdicts_total", "Plans made, by verdict.", label="verdict")
BYTES_PUSHED = Counter("statehub_push_bytes_total", "Bytes of uploads received.")

ALL = (TENSORS_DECODED, BYTES_FETCHED, FETCHES, PLAN_VERDICTS, BYTES_PUSHED)


def render() -> str:
    return "\n".join(line for counter in ALL for line in counter.render()) + "\n"
