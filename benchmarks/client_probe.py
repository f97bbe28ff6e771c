"""One ``Client.fetch`` in a process of its own, reporting that process's memory as JSON.

    python -m benchmarks.client_probe URL REF LAYERS CLASSES

The baseline is the RSS after the imports and the (meta-bodied) target are in place; the
peak is VmHWM after the fetch. Run by ``benchmarks.memory``.
"""

from __future__ import annotations

import json
import os
import sys

from benchmarks.harness import nbytes, proc_status_kib, target_net
from statehub import Client


def main() -> None:
    url, ref, layers, classes = sys.argv[1:5]
    target = target_net(int(layers), int(classes))
    with Client(url, cache=False) as hub:
        baseline = proc_status_kib(os.getpid(), "VmRSS")
        result = hub.fetch(ref, target=target)
        peak = proc_status_kib(os.getpid(), "VmHWM")
    print(json.dumps({"baseline_kib": baseline, "peak_kib": peak, "result_bytes": nbytes(result)}))


if __name__ == "__main__":
    main()
