"""The ``statehub`` command line against a real server process: push / ls / show / alias /
adapters, the CI gate (exit codes, JSON, JUnit, --allow-missing, --require), pull, diff, and
``inspect`` on real files written by torch.save. Exit codes and TTY behaviour that only a
real process shows are checked through ``python -m statehub.cli``."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import select
import socket
import struct
import subprocess
import sys
import termios
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from statehub import Client, spec_of
from statehub.cli import main
from tests._models import TinyResNet, randomize_buffers, seeded
from tests._server import ServerProcess

# Starts servers of its own (a statehub process, moto, a browser): not in the fast lane.
pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[2]


# Targets for --target module.path:callable.
def head5() -> nn.Module:
    return TinyResNet(num_classes=5)


def gray() -> nn.Module:
    return TinyResNet(in_chans=1)


def not_a_model() -> str:
    return "nope"


HEAD5 = "tests.client.test_cli:head5"
GRAY = "tests.client.test_cli:gray"
SAME = "tests._models:TinyResNet"


def resnet(seed: int = 0, **kwargs: Any) -> TinyResNet:
    seeded(seed)
    return randomize_buffers(TinyResNet(**kwargs), seed)


def cli(server: ServerProcess | str, *args: str) -> Result:
    url = server if isinstance(server, str) else server.url
    return CliRunner().invoke(main, ["--url", url, *args], catch_exceptions=False)


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def arch_fp_of(keys_and_shapes: dict[str, torch.Tensor]) -> str:
    """DESIGN section 4, written out: sha256 of sorted "{key}\\t{d0,d1,...}\\n" lines."""
    lines = sorted(
        f"{k}\t{','.join(str(d) for d in t.shape)}\n" for k, t in keys_and_shapes.items()
    )
    return hashlib.sha256("".join(lines).encode()).hexdigest()


@pytest.fixture
def pushed(hub: Client, ns: str) -> tuple[str, TinyResNet]:
    """A TinyResNet (10 classes, 3 channels) as version 1 of ``{ns}/resnet``."""
    model = resnet(1)
    hub.push(f"{ns}/resnet", model)
    return f"{ns}/resnet", model


# -- registry commands ------------------------------------------------------------------


def test_push_show_ls_alias(server: ServerProcess, ns: str, tmp_path: Path) -> None:
    path = tmp_path / "plain.pth"
    torch.save(resnet(2).state_dict(), path)
    name = f"{ns}/resnet"

    result = cli(server, "push", name, str(path), "--alias", "prod", "-m", '{"top1": 0.71}')
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"pushed {name}:1 (sha256:")
    assert "50 tensors" in result.stdout and "prod" in result.stdout

    again = cli(server, "push", name, str(path))
    assert again.exit_code == 0 and again.stdout.startswith(f"unchanged: identical to {name}:1")

    other = tmp_path / "other.safetensors"
    save_file(resnet(3).state_dict(), str(other))
    quiet = cli(server, "--quiet", "push", name, str(other))
    assert quiet.exit_code == 0 and quiet.stdout == f"{name}:2\n"

    listed = cli(server, "ls", "--namespace", ns)
    assert listed.exit_code == 0
    header, row = listed.stdout.splitlines()
    assert header.split()[:3] == ["MODEL", "LATEST", "TAGS"] and row.split()[:2] == [name, "2"]

    model = cli(server, "show", name)
    assert "aliases: latest -> 2, prod -> 1" in model.stdout
    assert [line.split()[0] for line in model.stdout.splitlines()[-2:]] == ["1", "2"]

    version = cli(server, "show", f"{name}@prod")
    assert f"version:  {name}:1" in version.stdout
    assert 'metadata: {"top1": 0.71}' in version.stdout

    assert cli(server, "alias", name, "prod", "2").stdout == f"{name}@prod -> 2\n"
    as_json = json.loads(cli(server, "show", f"{name}@prod", "--json").stdout)
    assert as_json["version"] == 2 and "prod" in as_json["aliases"]

    spec = json.loads(cli(server, "show", f"{name}:1", "--spec").stdout)
    assert spec == spec_of(TinyResNet())


def test_adapters_add_and_list(server: ServerProcess, ns: str, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter.json"
    adapter.write_text(
        json.dumps(
            {
                "name": f"{ns}-strip",
                "description": "drop the old head",
                "rules": [{"type": "drop", "pattern": r"fc\..*"}],
            }
        )
    )
    added = cli(server, "adapters", "add", str(adapter))
    assert added.exit_code == 0 and added.stdout == f"registered adapter {ns}-strip version 1\n"

    listed = cli(server, "adapters")
    row = next(line for line in listed.stdout.splitlines() if line.startswith(f"{ns}-strip"))
    assert row.split()[:4] == [f"{ns}-strip", "1", "-", "1"]
    assert any(
        a["name"] == f"{ns}-strip" for a in json.loads(cli(server, "adapters", "--json").stdout)
    )

    adapter.write_text(json.dumps({"name": f"{ns}-bad", "rules": [{"type": "nonsense"}]}))
    bad = cli(server, "adapters", "add", str(adapter))
    assert bad.exit_code == 1 and "[invalid_adapter]" in bad.stderr

    adapter.write_text(
        json.dumps({"name": "builtin-mine", "rules": [{"type": "drop", "pattern": "x"}]})
    )
    reserved = cli(server, "adapters", "add", str(adapter))
    assert reserved.exit_code == 1 and "[invalid_adapter]" in reserved.stderr
    assert "built-in recipes" in reserved.stderr


def test_adapters_builtin_lists_the_recipes(server: ServerProcess) -> None:
    listed = cli(server, "adapters", "--builtin")
    names = [line.split()[0] for line in listed.stdout.splitlines()[1:]]
    assert listed.exit_code == 0 and "builtin-vit-timm-to-transformers" in names
    recipes = json.loads(cli(server, "adapters", "--builtin", "--json").stdout)
    assert sorted(r["name"] for r in recipes) == sorted(names)


# -- plan and the CI gate ---------------------------------------------------------------


def test_plan_shows_what_maps_how(server: ServerProcess, pushed: tuple[str, TinyResNet]) -> None:
    name, _ = pushed
    result = cli(server, "plan", name, "--target", HEAD5)
    assert result.exit_code == 0
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line}
    assert rows["fc.weight"][:5] == ["fc.weight", "5x16", "keep", "-", "shape_ops"]
    assert "48 tensor(s) copied unchanged" in result.stdout
    assert "verdict: partial" in result.stdout
    assert "keys:    48 exact, 0 adapted, 2 kept of 50" in result.stdout

    listed = cli(server, "plan", name, "--target", HEAD5, "--all")
    assert "conv1.weight" in listed.stdout and "copied unchanged" not in listed.stdout

    adapted = cli(server, "plan", name, "--target", GRAY, "--json")
    plan = json.loads(adapted.stdout)
    assert plan["verdict"] == "adapted" and plan["plan_id"]
    assert plan["entries"][0]["ops"][0]["op"] == "adapt_in_channels"

    sliced = json.loads(cli(server, "plan", name, "-t", HEAD5, "--head", "slice", "--json").stdout)
    assert sliced["verdict"] == "adapted" and sliced["policy"]["head"] == "slice"


def test_target_forms_give_the_same_plan(
    server: ServerProcess, pushed: tuple[str, TinyResNet], tmp_path: Path
) -> None:
    name, _ = pushed
    checkpoint = tmp_path / "target.pth"
    torch.save(head5().state_dict(), checkpoint)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(cli(server, "inspect", str(checkpoint), "--spec").stdout)

    plan_ids = {
        json.loads(cli(server, "plan", name, "--target", target, "--json").stdout)["plan_id"]
        for target in (HEAD5, str(checkpoint), str(spec_file))
    }
    assert len(plan_ids) == 1


def test_check_exit_codes(server: ServerProcess, pushed: tuple[str, TinyResNet], ns: str) -> None:
    name, _ = pushed
    passed = cli(server, "check", name, "--target", SAME)
    assert passed.exit_code == 0, passed.output
    assert passed.stdout.rstrip().splitlines()[-1] == (
        f"PASS: {name}: verdict exact passes --require adapted"
    )

    failed = cli(server, "check", name, "--target", HEAD5)
    assert failed.exit_code == 1
    assert [
        line.split()[:2] for line in failed.stdout.splitlines() if line.startswith("FAIL  ")
    ] == [
        ["FAIL", "fc.weight"],
        ["FAIL", "fc.bias"],
    ]
    assert "FAIL: " in failed.stdout and "2 key(s) fail: fc.weight, fc.bias" in failed.stdout

    unreachable = cli(dead_url(), "check", name, "--target", SAME)
    assert unreachable.exit_code == 2 and "[connection_failed]" in unreachable.stderr

    missing = cli(server, "check", f"{ns}/missing", "--target", SAME)
    assert missing.exit_code == 2 and missing.stderr.startswith("error: ")
    assert "[not_found]" in missing.stderr

    for bad_target in ("no.such.module:build", "tests.client.test_cli:not_a_model", "nowhere"):
        usage = cli(server, "check", name, "--target", bad_target)
        assert usage.exit_code == 2 and "--target" in usage.stderr, bad_target

    assert cli(server, "check", name).exit_code == 2  # --target is required


def test_check_allow_missing_and_require(
    server: ServerProcess, pushed: tuple[str, TinyResNet]
) -> None:
    name, _ = pushed

    def gate(*args: str) -> dict[str, Any]:
        result = cli(server, "check", name, "--json", *args)
        data = json.loads(result.stdout)
        assert result.exit_code == (0 if data["passed"] else 1)
        return data

    partial = gate("--target", HEAD5)
    assert partial["verdict"] == "partial" and not partial["passed"]
    assert partial["failing"] == ["fc.weight", "fc.bias"] and partial["required"] == "adapted"

    excused = gate("--target", HEAD5, "--allow-missing", "fc.*")
    assert excused["passed"] and excused["effective_verdict"] == "exact"  # all but the head
    assert excused["allowed_missing"] == ["fc.weight", "fc.bias"]

    half = gate("--target", HEAD5, "--allow-missing", "fc.weight")
    assert not half["passed"] and half["failing"] == ["fc.bias"]

    both = gate("--target", HEAD5, "--allow-missing", "fc.weight", "--allow-missing", "*.bias")
    assert both["passed"]

    assert gate("--target", HEAD5, "--require", "partial")["passed"]
    assert gate("--target", HEAD5, "--require", "exact", "--allow-missing", "fc.*")["passed"]

    adapted = gate("--target", GRAY, "--require", "exact")
    assert not adapted["passed"] and adapted["failing"] == ["conv1.weight"]
    assert gate("--target", GRAY)["passed"]
    assert gate("--target", SAME, "--require", "exact")["passed"]

    strict = gate("--target", GRAY, "--strict", "--require", "partial")
    assert strict["verdict"] == "incompatible" and not strict["passed"]
    assert strict["reasons"]

    assert cli(server, "check", name, "-t", SAME, "--require", "perfect").exit_code == 2


def test_check_writes_junit(
    server: ServerProcess, pushed: tuple[str, TinyResNet], tmp_path: Path
) -> None:
    name, _ = pushed
    report = tmp_path / "reports" / "statehub.xml"
    result = cli(server, "check", name, "--target", HEAD5, "--junit", str(report))
    assert result.exit_code == 1

    suite = ET.parse(report).getroot().find("testsuite")
    assert suite is not None
    assert suite.get("tests") == "51" and suite.get("failures") == "3"
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["verdict"] == "partial" and props["required"] == "adapted"
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert len(cases) == 51 and {c.get("classname") for c in cases.values()} == {
        f"statehub.check.{name}"
    }
    verdict = cases["verdict"].find("failure")
    assert verdict is not None and verdict.get("message") == (
        "verdict partial fails --require adapted"
    )
    assert "2 key(s) fail: fc.weight, fc.bias" in (verdict.text or "")
    head = cases["fc.weight"].find("failure")
    assert head is not None and head.get("type") == "action.keep_target"
    assert "keeps the target's own value" in (head.get("message") or "")
    assert cases["conv1.weight"].find("failure") is None

    excused = cli(
        server, "check", name, "-t", HEAD5, "--allow-missing", "fc.*", "--junit", str(report)
    )
    assert excused.exit_code == 0
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0" and suite.get("skipped") == "2"
    assert not list(suite.iter("failure"))
    skipped = [c.get("name") for c in suite.iter("testcase") if c.find("skipped") is not None]
    assert skipped == ["fc.weight", "fc.bias"]


# -- pull and diff ----------------------------------------------------------------------


def test_pull_fitted_and_stored(
    server: ServerProcess, pushed: tuple[str, TinyResNet], hub: Client, tmp_path: Path
) -> None:
    name, source = pushed
    out = tmp_path / "out" / "fitted.safetensors"
    result = cli(server, "pull", name, "--target", HEAD5, "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "verdict partial" in result.stdout and "fc.weight, fc.bias" in result.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["fitted.safetensors"]
    tensors = load_file(str(out))
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(tensors[key], value), key
    with safe_open(str(out), "pt") as handle:
        assert json.loads(handle.metadata()["statehub.keep_target"]) == ["fc.weight", "fc.bias"]

    stored = tmp_path / "stored.safetensors"
    result = cli(server, "--quiet", "pull", f"{name}:1", "-o", str(stored))
    assert result.exit_code == 0 and result.stdout == f"{stored}\n"
    digest = hub.version(f"{name}:1").digest
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest

    refused = cli(server, "pull", name, "-t", HEAD5, "--strict", "-o", str(tmp_path / "x"))
    assert refused.exit_code == 1 and "[incompatible]" in refused.stderr
    assert "reason: strict policy" in refused.stderr
    assert not (tmp_path / "x").exists()

    assert cli(server, "pull", name, "--head", "slice").exit_code == 2  # policy without target


def test_diff_refs_and_files(server: ServerProcess, hub: Client, ns: str, tmp_path: Path) -> None:
    model = resnet(4)
    wrapped = nn.DataParallel(model).state_dict()
    hub.push(f"{ns}/resnet", model)
    hub.push(f"{ns}/resnet", wrapped)

    refs = cli(server, "diff", f"{ns}/resnet:1", f"{ns}/resnet:2")
    assert refs.exit_code == 0, refs.output
    assert "50  prefix  add wrapper 'module.'" in refs.stdout
    assert "verdict: adapted" in refs.stdout
    onto_model = json.loads(cli(server, "diff", f"{ns}/resnet:2", HEAD5, "--json").stdout)
    assert onto_model["verdict"] == "partial"

    plain, dp, small = tmp_path / "plain.pth", tmp_path / "dp.pth", tmp_path / "small.pth"
    torch.save(model.state_dict(), plain)
    torch.save(wrapped, dp)
    torch.save(head5().half().state_dict(), small)
    same = cli(server, "diff", str(plain), str(dp))
    assert "b: wrapper prefix module." in same.stdout
    assert "no differences in keys, shapes or dtypes" in same.stdout

    changed = json.loads(cli(server, "diff", str(plain), str(small), "--json").stdout)
    assert changed["only_in_a"] == changed["only_in_b"] == []
    assert [d["key"] for d in changed["shape"]] == ["fc.weight", "fc.bias"]
    assert changed["shape"][0] == {"key": "fc.weight", "a": [10, 16], "b": [5, 16]}
    assert {d["b"] for d in changed["dtype"]} == {"F16"}

    file_vs_ref = cli(server, "diff", str(dp), f"{ns}/resnet:1")
    assert "a: wrapper prefix module." in file_vs_ref.stdout


def test_find_ranks_candidates(server: ServerProcess, hub: Client, ns: str) -> None:
    hub.push(f"{ns}/five", resnet(5, num_classes=5))
    result = cli(server, "find", "--target", HEAD5, "--json")
    hits = [h for h in json.loads(result.stdout) if h["model"] == f"{ns}/five"]
    assert hits and hits[0]["verdict"] == "exact"


# -- inspect: local files written by torch.save -----------------------------------------


def compiled(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # torch's dynamo import warns about its own deprecations
        warnings.simplefilter("ignore")
        return torch.compile(model)  # lazy: nothing is compiled until a forward


def test_inspect_plain_dataparallel_and_compiled(tmp_path: Path) -> None:
    model = resnet(6)
    cases = {
        "plain": (model.state_dict(), "prefixes:   none"),
        "dp": (nn.DataParallel(model).state_dict(), "prefixes:   module. (DataParallel"),
        "compiled": (compiled(model).state_dict(), "prefixes:   _orig_mod. (torch.compile)"),
    }
    for label, (state_dict, prefix_line) in cases.items():
        path = tmp_path / f"{label}.pth"
        torch.save(state_dict, path)
        result = cli("http://unused.invalid", "inspect", str(path))  # local: no server
        assert result.exit_code == 0, result.output
        out = result.stdout
        assert prefix_line in out, label
        assert "snapshot:   no (a plain state_dict)" in out
        assert "tensors:    50" in out and "parameters: 7,594" in out
        assert "dtypes:     F32 x42, I64 x8" in out
        assert f"arch_fp:    {arch_fp_of(state_dict)}" in out

        report = json.loads(cli("x", "inspect", str(path), "--json").stdout)
        assert report["format"] == "torch-zip"
        assert (
            report["wrapper_prefixes"]
            == {"plain": [], "dp": ["module."], "compiled": ["_orig_mod."]}[label]
        )
        assert report["arch_fp"] == arch_fp_of(state_dict)

        spec = json.loads(cli("x", "inspect", str(path), "--spec").stdout)
        assert [t["key"] for t in spec["tensors"]] == list(state_dict)


def test_inspect_training_snapshot(tmp_path: Path) -> None:
    model = resnet(7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    optimizer.step()
    path = tmp_path / "snapshot.pth"
    torch.save(
        {
            "epoch": 12,
            "state_dict": nn.DataParallel(model).state_dict(),
            "state_dict_ema": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "best_top1": 0.713,
        },
        path,
    )
    out = cli("x", "inspect", str(path)).stdout
    assert "top-level keys: epoch, state_dict, state_dict_ema, optimizer, best_top1" in out
    assert "weights:    from 'state_dict'" in out
    assert "ema:        state_dict_ema" in out
    assert "dropped:    optimizer, state_dict_ema (not stored)" in out
    assert "  epoch = 12" in out and "  best_top1 = 0.713" in out
    assert "prefixes:   module." in out
    assert f"arch_fp:    {arch_fp_of(nn.DataParallel(model).state_dict())}" in out

    ema = json.loads(cli("x", "inspect", str(path), "--ema", "--json").stdout)
    assert ema["state_dict_key"] == "state_dict_ema" and ema["wrapper_prefixes"] == []
    assert ema["arch_fp"] == arch_fp_of(model.state_dict())


def test_inspect_arch_fp_matches_the_server(hub: Client, ns: str, tmp_path: Path) -> None:
    model = resnet(8)
    for i, state_dict in enumerate([model.state_dict(), nn.DataParallel(model).state_dict()]):
        path = tmp_path / f"m{i}.pth"
        torch.save({"model": state_dict, "epoch": 1}, path)
        report = json.loads(cli("x", "inspect", str(path), "--json").stdout)
        version = hub.push(f"{ns}/m{i}", path)
        assert report["arch_fp"] == version.arch_fp
        assert report["shape_fp"] == version.shape_fp
        assert report["param_count"] == version.param_count


def test_inspect_safetensors_and_tied_weights(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(resnet(9).half().state_dict(), str(path), metadata={"format": "pt"})
    out = cli("x", "inspect", str(path)).stdout
    assert "(safetensors," in out and "dtypes:     F16 x42, I64 x8" in out
    assert "metadata:   format" in out

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight

    tied = tmp_path / "tied.pth"
    torch.save(Tied().state_dict(), tied)
    assert "tied:       embed.weight = out.weight" in cli("x", "inspect", str(tied)).stdout


def test_inspect_refuses_what_it_cannot_read_without_running_it(tmp_path: Path) -> None:
    import argparse

    marker = tmp_path / "pwned"
    path = tmp_path / "args.pth"
    torch.save({"state_dict": resnet().state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    result = cli("x", "inspect", str(path))
    assert result.exit_code == 1 and result.stderr.startswith("error: ")
    assert "argparse.Namespace" in result.stderr and "Traceback" not in result.stderr

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": resnet().state_dict(), "x": Exploit()}, evil)
    result = cli("x", "inspect", str(evil))
    assert result.exit_code == 1 and not marker.exists()

    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00" * 64)
    assert cli("x", "inspect", str(garbage)).exit_code == 1
    assert cli("x", "inspect", str(tmp_path / "absent.pth")).exit_code == 2


# -- errors -----------------------------------------------------------------------------


def test_errors_are_one_line_with_their_code(
    server: ServerProcess, ns: str, tmp_path: Path
) -> None:
    missing = cli(server, "show", f"{ns}/missing")
    assert missing.exit_code == 1 and missing.stdout == ""
    assert missing.stderr.startswith(f"error: model {ns}/missing does not exist")
    assert "[not_found] (request id " in missing.stderr

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    bad = cli(server, "push", f"{ns}/bad", str(garbage))
    assert bad.exit_code == 1 and "[invalid_checkpoint]" in bad.stderr

    wrong_name = cli(server, "push", f"{ns}/-bad", str(garbage))
    assert wrong_name.exit_code == 1 and "[invalid_name]" in wrong_name.stderr

    unreachable = cli(dead_url(), "ls")
    assert unreachable.exit_code == 2 and "[connection_failed]" in unreachable.stderr

    bad_json = cli(server, "push", f"{ns}/x", str(garbage), "--metadata", "{nope")
    assert bad_json.exit_code == 2 and "not valid JSON" in bad_json.stderr
    assert cli(server, "push", f"{ns}/x", str(tmp_path / "absent.pth")).exit_code == 2


# -- real processes: exit codes, tracebacks and TTY progress ------------------------------


def run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "statehub.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_process_exit_codes_without_tracebacks(
    server: ServerProcess, pushed: tuple[str, TinyResNet]
) -> None:
    name, _ = pushed
    ok = run_module("--url", server.url, "check", name, "--target", SAME, "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["passed"]
    failed = run_module("--url", server.url, "check", name, "--target", HEAD5)
    assert failed.returncode == 1 and failed.stderr == ""
    down = run_module("check", name, "--target", SAME, env={"STATEHUB_URL": dead_url()})
    assert down.returncode == 2
    assert down.stderr.startswith("error: cannot reach statehub") and "Traceback" not in down.stderr


def run_in_pty(*args: str) -> tuple[int, str]:
    """Run the CLI with a terminal as stdout and stderr; returns (exit code, all output)."""
    leader, follower = pty.openpty()
    # A real terminal has a size; on a 0-column one tqdm draws an empty bar.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "statehub.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        cwd=REPO,
    )
    os.close(follower)
    output = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            process.kill()
            break
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        output += data
    os.close(leader)
    return process.wait(timeout=60), output.decode(errors="replace")


def test_progress_bars_only_on_a_terminal(server: ServerProcess, ns: str, tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save(resnet(10).state_dict(), path)

    code, output = run_in_pty("--url", server.url, "push", f"{ns}/tty", str(path))
    assert code == 0 and f"push {path.name}" in output and "B/s" in output
    assert f"pushed {ns}/tty:1" in output

    code, output = run_in_pty("--url", server.url, "-q", "push", f"{ns}/tty", str(path))
    assert code == 0 and f"push {path.name}" not in output

    piped = run_module("--url", server.url, "pull", f"{ns}/tty", "-o", str(tmp_path / "o.st"))
    assert piped.returncode == 0 and piped.stderr == ""
    code, output = run_in_pty(
        "--url", server.url, "pull", f"{ns}/tty", "-t", SAME, "-o", str(tmp_path / "p.st")
    )
    assert code == 0 and f"pull {ns}/tty" in output and "B/s" in output
