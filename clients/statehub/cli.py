"""The ``statehub`` command line.

Exit codes: 0 success; 1 a server error (``error: <message> [<code>]`` on stderr) or, for
``check``, a verdict the gate does not allow; 2 a usage error or an unreachable server (and,
for ``check``, any error that keeps the gate from deciding). Never a traceback, unless
``STATEHUB_DEBUG=1``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import torch

from statehub._cache import Cache
from statehub._client import Client, Progress, split_ref
from statehub._errors import ConnectionFailed, StatehubError
from statehub._gate import REQUIREMENTS, GateResult, evaluate, junit_xml
from statehub._inspect import WRAPPER_ORIGINS, CheckpointReport, inspect_checkpoint
from statehub._models import Plan, PlanEntry, Version
from statehub._tensors import arch_fp, read_safetensors_header, spec_of, wrapper_prefixes

F = TypeVar("F", bound=Callable[..., Any])

# ``package.module:factory`` (dots allowed on both sides), as uvicorn and gunicorn spell it.
CALLABLE_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
USAGE_EXIT = 2


# -- plumbing ---------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    """Global options, shared by every command through the click context."""

    url: str | None
    token: str | None
    quiet: bool
    _client: Client | None = None

    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.url, self.token)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(code)


def _describe_error(exc: StatehubError) -> str:
    text = f"{exc.message} [{exc.code}]"
    if exc.request_id:
        text += f" (request id {exc.request_id})"
    reasons = (exc.detail.get("plan") or {}).get("reasons") or []
    errors = exc.detail.get("errors") or []
    extra = [f"  reason: {r}" for r in reasons] + [f"  {e}" for e in errors if isinstance(e, str)]
    return "\n".join([text, *extra[:20]])


class StatehubGroup(click.Group):
    """Maps every failure to ``error: ...`` on stderr and an exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except ConnectionFailed as exc:
            _fail(_describe_error(exc), USAGE_EXIT)
        except StatehubError as exc:
            _fail(_describe_error(exc), ctx.meta.get("statehub.error_exit", 1))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            _debug()
            _fail(str(exc) or type(exc).__name__, ctx.meta.get("statehub.error_exit", 1))
        except Exception as exc:
            _debug()
            _fail(
                f"unexpected {type(exc).__name__}: {exc} (STATEHUB_DEBUG=1 shows the traceback)",
                ctx.meta.get("statehub.error_exit", 1),
            )


def _debug() -> None:
    if os.environ.get("STATEHUB_DEBUG"):
        traceback.print_exc()


def _settings(ctx: click.Context) -> Settings:
    settings = ctx.find_object(Settings)
    assert settings is not None
    return settings


def _progress_enabled(settings: Settings) -> bool:
    return not settings.quiet and sys.stdout.isatty()


@contextmanager
def _progress_bar(settings: Settings, description: str) -> Iterator[Progress | None]:
    """A tqdm byte counter on stderr, or None when quiet or stdout is not a terminal."""
    if not _progress_enabled(settings):
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(desc=description, unit="B", unit_scale=True, unit_divisor=1024, leave=False)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _human_count(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


# -- targets and policy -----------------------------------------------------------------


def resolve_target(value: str) -> Any:
    """A ``--target``: a checkpoint or spec file, or ``module.path:callable`` (called).

    Raises:
        click.BadParameter: it is neither, or building the model failed.
    """
    path = Path(value).expanduser()
    if path.is_file():
        try:
            spec_of(path)  # read what the spec needs now, so a bad file is a usage error
        except Exception as exc:  # whatever the file is, it is not a usable target
            raise click.BadParameter(f"{value}: not a checkpoint or spec file ({exc})") from None
        return path
    if CALLABLE_TARGET.match(value):
        return _build_from_callable(value)
    if path.exists():
        raise click.BadParameter(f"{value} is a directory; pass a file")
    raise click.BadParameter(
        f"{value!r} is neither a file nor 'module.path:callable' (e.g. mypkg.models:resnet18)"
    )


def _build_from_callable(value: str) -> Any:
    module_name, _, attribute = value.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: the current project imports
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"cannot import {value}: {exc}") from None
    if callable(obj) and not isinstance(obj, torch.nn.Module):
        try:
            obj = obj()
        except Exception as exc:
            raise click.BadParameter(f"calling {value}() failed: {exc!r}") from None
    if isinstance(obj, torch.nn.Module) or (isinstance(obj, dict) and obj):
        return obj
    raise click.BadParameter(
        f"{value} gave a {type(obj).__name__}; expected an nn.Module or a state_dict"
    )


def _target_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    return None if value is None else resolve_target(value)


def target_option(*, required: bool) -> Callable[[F], F]:
    return click.option(
        "--target",
        "-t",
        required=required,
        callback=_target_callback,
        metavar="SPEC_OR_FILE",
        help="The model the weights are for: module.path:callable (imported and called), "
        "a checkpoint file, or a spec JSON file (see `inspect --spec`).",
    )


POLICY_PARAMS = (
    "strict",
    "head",
    "embedding",
    "on_missing",
    "no_structural",
    "allow_op",
    "adapter",
    "no_builtin",
    "param",
)


def _parse_params(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> dict[str, int]:
    params: dict[str, int] = {}
    for value in values:
        name, sep, number = value.partition("=")
        if not sep or not name or not number.isdigit():
            raise click.BadParameter(f"{value!r} is not NAME=N (e.g. head_dim=128)")
        params[name] = int(number)
    return params


def policy_options(func: F) -> F:
    """The planner's policy as flags; only the flags given are sent."""
    options = [
        click.option("--strict", is_flag=True, help="Anything but an exact plan is refused."),
        click.option(
            "--head",
            type=click.Choice(["keep", "slice"]),
            help="Classifier head with other rows: keep the target's, or take the first rows.",
        ),
        click.option(
            "--embedding",
            type=click.Choice(["keep", "resize"]),
            help="Embedding rows that differ: keep the target's, or truncate / zero-pad.",
        ),
        click.option(
            "--on-missing",
            type=click.Choice(["keep", "error"]),
            help="Target keys the checkpoint lacks: keep the target's values, or fail.",
        ),
        click.option(
            "--no-structural", is_flag=True, help="Do not align renamed modules by structure."
        ),
        click.option(
            "--allow-op",
            multiple=True,
            metavar="OP",
            help="Only these ops may be used (repeatable): adapt_in_channels, slice, pad, "
            "resample_pos_embed, cast, fill, reshape, transpose, unflatten, flatten, concat, "
            "stack.",
        ),
        click.option(
            "--adapter",
            multiple=True,
            metavar="NAME",
            help="Apply this adapter or built-in recipe (repeatable).",
        ),
        click.option(
            "--no-builtin",
            is_flag=True,
            help="Do not apply built-in recipes by themselves (statehub adapters --builtin).",
        ),
        click.option(
            "--param",
            multiple=True,
            metavar="NAME=N",
            callback=_parse_params,
            help="A model fact a recipe needs, e.g. head_dim=128 (repeatable); the version's "
            "config.json or params.json gives it otherwise.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _policy(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pops the policy flags out of a command's keyword arguments."""
    values = {name: kwargs.pop(name) for name in POLICY_PARAMS}
    policy: dict[str, Any] = {}
    if values["strict"]:
        policy["strict"] = True
    for name in ("head", "embedding", "on_missing"):
        if values[name] is not None:
            policy[name] = values[name]
    if values["no_structural"]:
        policy["allow_structural"] = False
    if values["allow_op"]:
        policy["allow_ops"] = list(values["allow_op"])
    if values["adapter"]:
        policy["adapters"] = list(values["adapter"])
    if values["no_builtin"]:
        policy["builtin"] = False
    if values["param"]:
        policy["params"] = values["param"]
    return policy


def _is_versioned(ref: str) -> bool:
    _, sep, tail = ref.rpartition(":")
    return "@" in ref or bool(sep and tail.isdigit())


# -- rendering plans --------------------------------------------------------------------


def _action_label(entry: PlanEntry) -> str:
    if entry.action == "keep_target":
        return "keep"
    if entry.tied_to:
        return f"{entry.action} (tied)"
    return entry.action


def _entry_detail(entry: PlanEntry) -> str:
    ops = ", ".join(str(op.get("op", op)) for op in entry.ops)
    parts = [f"ops: {ops}" if ops else "", entry.rule]
    return "; ".join(p for p in parts if p)


def _shape_text(shape: Sequence[int] | None) -> str:
    if shape is None:
        return "-"
    return "x".join(str(d) for d in shape) or "scalar"


def _listed(entry: PlanEntry, marks: dict[str, str], show_all: bool) -> bool:
    """Rows worth a line of their own: anything but a plain copy by name or prefix."""
    plain = entry.action == "copy" and not entry.ops and entry.stage in ("exact", "prefix")
    return show_all or not plain or entry.target in marks


def render_plan(
    plan: Plan,
    target_spec: dict[str, Any] | None,
    *,
    show_all: bool,
    marks: dict[str, str] | None = None,
) -> str:
    """The table of what maps how.

    Plain copies (same name, or a prefix rule) are summarised per rule unless ``show_all``;
    every other entry gets a row: renames, ops, structural matches, kept keys.
    """
    shapes = {t["key"]: t["shape"] for t in (target_spec or {}).get("tensors", [])}
    marks = marks or {}
    shown = [e for e in plan.entries if _listed(e, marks, show_all)]
    headers = ["", "TARGET", "SHAPE", "ACTION", "SOURCE", "STAGE", "DETAIL"]
    rows = [
        [
            marks.get(e.target, ""),
            e.target,
            _shape_text(shapes.get(e.target)),
            _action_label(e),
            e.source or "-",
            e.stage,
            _entry_detail(e),
        ]
        for e in shown
    ]
    if not marks:
        headers, rows = headers[1:], [r[1:] for r in rows]
    if not shapes:
        index = headers.index("SHAPE")
        headers.pop(index)
        rows = [r[:index] + r[index + 1 :] for r in rows]
    parts = [_table(headers, rows)] if rows else []
    hidden = [e for e in plan.entries if not _listed(e, marks, show_all)]
    if hidden:
        parts.append(_render_copies(hidden))
    return "\n\n".join(parts)


def _render_copies(entries: Sequence[PlanEntry]) -> str:
    groups: dict[tuple[str, str], list[PlanEntry]] = {}
    for entry in entries:
        groups.setdefault((entry.stage, entry.rule), []).append(entry)
    rows = []
    for (stage, rule), members in groups.items():
        first = members[0]
        example = "" if first.source == first.target else f"e.g. {first.source} -> {first.target}"
        rows.append([f"  {len(members)}", stage, rule or "same name and shape", example])
    title = f"{len(entries)} tensor(s) copied unchanged (--all lists them):"
    return title + "\n" + _table(["", "", "", ""], rows).split("\n", 1)[1]


def render_summary(plan: Plan) -> str:
    keys, params = plan.coverage["keys"], plan.coverage["params"]
    color = {"exact": "green", "adapted": "green", "partial": "yellow"}.get(plan.verdict, "red")
    lines = [
        f"verdict: {click.style(plan.verdict, fg=color, bold=True)}",
        f"keys:    {keys['exact']} exact, {keys['adapted']} adapted, {keys['kept']} kept "
        f"of {keys['total']}",
        f"params:  {params['fraction'] * 100:.1f}% from the checkpoint "
        f"({_human_count(params['exact'] + params['adapted'])} of "
        f"{_human_count(params['total'])})",
    ]
    if plan.unused:
        lines.append(f"unused:  {len(plan.unused)} checkpoint key(s): {_abbreviate(plan.unused)}")
    if plan.dropped:
        lines.append(f"dropped: {len(plan.dropped)} by adapters: {_abbreviate(plan.dropped)}")
    if plan.adapters:
        names = ", ".join(str(a.get("name", a)) for a in plan.adapters)
        lines.append(f"adapters: {names}")
    lines += [f"warning: {w}" for w in plan.warnings]
    lines += [f"reason:  {r}" for r in plan.reasons]
    return "\n".join(lines)


def _abbreviate(items: Sequence[str], limit: int = 6) -> str:
    more = f", ... (+{len(items) - limit})" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# -- commands ---------------------------------------------------------------------------


@click.group(cls=StatehubGroup)
@click.version_option(package_name="statehub")
@click.option(
    "--url", envvar="STATEHUB_URL", help="Server address [env STATEHUB_URL; 127.0.0.1:8000]."
)
@click.option("--token", envvar="STATEHUB_TOKEN", help="Bearer token [env STATEHUB_TOKEN].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars, only essential output.")
@click.pass_context
def main(ctx: click.Context, url: str | None, token: str | None, quiet: bool) -> None:
    """statehub: a registry that fits stored PyTorch checkpoints to your model."""
    settings = Settings(url=url, token=token, quiet=quiet)
    ctx.obj = settings
    ctx.call_on_close(settings.close)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--host", help="Listen address (default 127.0.0.1).")
@click.option("--port", type=int, help="Port (default 8000).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Embedded data directory.")
def serve(host: str | None, port: int | None, data_dir: str | None) -> None:
    """Run the server (needs the [server] extra). Settings also come from STATEHUB_* vars."""
    args = [sys.executable, "-m", "service"]
    for flag, value in (("--host", host), ("--port", port), ("--data-dir", data_dir)):
        if value is not None:
            args += [flag, str(value)]
    # The server runs as its own program: the client package never imports it.
    os.execv(sys.executable, args)


@main.command()
def migrate() -> None:
    """Apply pending database migrations and exit (needs the [server] extra).

    The one-shot step before starting replicas that run with STATEHUB_MIGRATE_ON_START=false
    (a compose service, a Kubernetes Job). Settings come from STATEHUB_* vars.
    """
    os.execv(sys.executable, [sys.executable, "-m", "service", "migrate"])


def _metadata_callback(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> dict[str, Any] | None:
    if value is None:
        return None
    text = value
    if value.startswith("@"):
        try:
            text = Path(value[1:]).read_text()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {value[1:]}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise click.BadParameter("must be a JSON object")
    return data


@main.command()
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, path_type=Path))
@click.option("--alias", "-a", help="Also point this alias (e.g. prod) at the new version.")
@click.option(
    "--metadata",
    "-m",
    callback=_metadata_callback,
    metavar="JSON",
    help="A JSON object kept with the version (or @file.json).",
)
@click.option("--ema", is_flag=True, help="Store the EMA weights of a training snapshot.")
@click.option("--json", "as_json", is_flag=True, help="Print the version as JSON.")
@click.pass_context
def push(
    ctx: click.Context,
    name: str,
    file: Path,
    alias: str | None,
    metadata: dict[str, Any] | None,
    ema: bool,
    as_json: bool,
) -> None:
    """Upload FILE (.safetensors/.pth/.pt/.bin/.ckpt) as the next version of NAME.

    FILE may be a folder (a save_pretrained output): every file is kept byte for byte, and
    its weights (one .safetensors, an index and its shards, or one torch file) are planned.
    """
    settings = _settings(ctx)
    if file.is_dir():
        if ema:
            raise click.UsageError("--ema applies to a training snapshot file, not a folder")
        version = settings.client().push_folder(name, file, alias=alias, metadata=metadata)
        if as_json:
            _echo_json(dataclasses.asdict(version))
        elif settings.quiet:
            click.echo(version.ref)
        else:
            click.echo(f"{_pushed_line(version)}; {len(version.files or [])} files")
        return
    with _progress_bar(settings, f"push {file.name}") as progress:
        version = settings.client().push(
            name, file, alias=alias, metadata=metadata, ema=ema, progress=progress
        )
    if as_json:
        _echo_json(dataclasses.asdict(version))
    elif settings.quiet:
        click.echo(version.ref)
    else:
        click.echo(_pushed_line(version))


def _pushed_line(version: Version) -> str:
    if not version.created:
        return f"unchanged: identical to {version.ref} (sha256:{version.digest[:12]})"
    source = version.source_format
    key = version.ingest.get("state_dict_key")
    if key:
        source += f" '{key}'"
    aliases = f"; aliases: {', '.join(version.aliases)}" if version.aliases else ""
    return (
        f"pushed {version.ref} (sha256:{version.digest[:12]}, {version.tensor_count} tensors, "
        f"{_human_count(version.param_count)} params, from {source}){aliases}"
    )


@main.command()
@click.argument("ref")
@target_option(required=False)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write (default NAME-VERSION.safetensors).",
)
@click.option(
    "--files",
    "files_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write every file of a version pushed as a folder into this folder, as pushed.",
)
@policy_options
@click.pass_context
def pull(
    ctx: click.Context,
    ref: str,
    target: Any,
    output: Path | None,
    files_dir: Path | None,
    **kwargs: Any,
) -> None:
    """Save REF as a safetensors file, fitted to --target (or as stored without one).

    The fitted file's metadata carries the plan (statehub.plan) and the keys the target
    keeps (statehub.keep_target), which it does not contain. With --files DIR, the files of
    a version pushed as a folder, byte for byte, each sha256-checked.
    """
    settings = _settings(ctx)
    if files_dir is not None:
        if target is not None or output is not None:
            raise click.UsageError("--files writes the folder as pushed: no --target or --output")
        client = settings.client()
        client.snapshot(ref, files_dir)
        count = len(client.files(ref))
        click.echo(str(files_dir) if settings.quiet else f"wrote {count} files to {files_dir}")
        return
    policy = _policy(kwargs)
    if target is None and policy:
        raise click.UsageError("policy options need --target")
    model, version = split_ref(ref)
    path = output or Path(f"{model.split('/')[-1]}-{version.replace(':', '_')}.safetensors")
    with _progress_bar(settings, f"pull {ref}") as progress:
        settings.client().pull(ref, path, target=target, progress=progress, **policy)
    if settings.quiet:
        click.echo(str(path))
        return
    size = _human_bytes(path.stat().st_size)
    if target is None:
        click.echo(f"wrote {path} ({size}): the stored checkpoint, sha256 verified")
        return
    metadata = read_safetensors_header(path).get("__metadata__") or {}
    verdict = json.loads(metadata.get("statehub.plan", "{}")).get("verdict", "?")
    kept = json.loads(metadata.get("statehub.keep_target", "[]"))
    click.echo(f"wrote {path} ({size}): verdict {verdict}")
    if kept:
        click.echo(
            f"{len(kept)} key(s) keep the target's own values and are not in the file: "
            f"{_abbreviate(kept)}\nload with strict=False, or use Client.fetch(), which "
            "fills them from the model"
        )


@main.command()
@click.argument("ref")
@target_option(required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--all", "show_all", is_flag=True, help="List exact copies too.")
@policy_options
@click.pass_context
def plan(
    ctx: click.Context, ref: str, target: Any, as_json: bool, show_all: bool, **kwargs: Any
) -> None:
    """How REF maps onto --target; no weights move."""
    policy = _policy(kwargs)
    result = _settings(ctx).client().plan(ref, target=target, **policy)
    if as_json:
        _echo_json({"plan_id": result.plan_id, **result.raw})
        return
    table = render_plan(result, spec_of(target), show_all=show_all)
    click.echo("\n\n".join(p for p in (table, render_summary(result)) if p))


@main.command()
@click.argument("ref")
@target_option(required=True)
@click.option(
    "--require",
    type=click.Choice(REQUIREMENTS),
    default="adapted",
    show_default=True,
    help="The weakest verdict that passes.",
)
@click.option(
    "--allow-missing",
    multiple=True,
    metavar="PATTERN",
    help="Target keys (glob, repeatable) that may keep their own values, e.g. 'fc.*'.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the decision and plan as JSON.")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), help="Write JUnit XML.")
@click.option("--all", "show_all", is_flag=True, help="List exact copies too.")
@policy_options
@click.pass_context
def check(
    ctx: click.Context,
    ref: str,
    target: Any,
    require: str,
    allow_missing: tuple[str, ...],
    as_json: bool,
    junit: Path | None,
    show_all: bool,
    **kwargs: Any,
) -> None:
    """CI gate: exit 0 when REF fits --target as --require asks, 1 when not, 2 on errors.

    \b
    Example (GitHub Actions, GitLab CI...):
      statehub check vision/resnet50@prod --target mypkg.models:build_model \\
          --allow-missing 'fc.*' --junit statehub.xml
    """
    ctx.meta["statehub.error_exit"] = USAGE_EXIT  # an error means the gate could not decide
    policy = _policy(kwargs)
    result = evaluate(
        _settings(ctx).client().plan(ref, target=target, **policy),
        ref=ref,
        require=require,
        allow_missing=allow_missing,
    )
    if junit is not None:
        junit.parent.mkdir(parents=True, exist_ok=True)
        junit.write_text(junit_xml(result))
    if as_json:
        _echo_json(result.to_json())
    else:
        click.echo(_render_gate(result, spec_of(target), show_all=show_all))
    raise click.exceptions.Exit(0 if result.passed else 1)


def _render_gate(result: GateResult, target_spec: dict[str, Any], *, show_all: bool) -> str:
    marks = {key: "FAIL" for key in result.failing} | {key: "ok*" for key in result.excused}
    parts = [
        render_plan(result.plan, target_spec, show_all=show_all, marks=marks),
        render_summary(result.plan),
    ]
    if result.excused:
        parts.append(f"* {len(result.excused)} kept key(s) allowed by --allow-missing")
    status = (
        click.style("PASS", fg="green", bold=True)
        if result.passed
        else click.style("FAIL", fg="red", bold=True)
    )
    line = f"{status}: {result.ref}: {result.summary}"
    if result.failing:
        line += f"; {len(result.failing)} key(s) fail: {_abbreviate(result.failing)}"
    parts.append(line)
    return "\n\n".join(p for p in parts if p)


@main.command(name="ls")
@click.argument("query", required=False)
@click.option("--namespace", "-n", help="Only this namespace.")
@click.option("--tag", help="Only models with this tag.")
@click.option("--arch-fp", help="Only models with a version of this architecture.")
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON.")
@click.pass_context
def list_models(
    ctx: click.Context,
    query: str | None,
    namespace: str | None,
    tag: str | None,
    arch_fp: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List models (QUERY matches names and descriptions)."""
    page = (
        _settings(ctx)
        .client()
        .list_models(query=query, namespace=namespace, tag=tag, arch_fp=arch_fp, limit=limit)
    )
    if as_json:
        _echo_json(page)
        return
    rows = [
        [
            f"{m['namespace']}/{m['name']}",
            m.get("latest_version") or "-",
            ",".join(m.get("tags") or []) or "-",
            str(m.get("updated_at", ""))[:19].replace("T", " "),
            (m.get("description") or "")[:50],
        ]
        for m in page["items"]
    ]
    if not rows:
        click.echo("no models", err=True)
        return
    click.echo(_table(["MODEL", "LATEST", "TAGS", "UPDATED", "DESCRIPTION"], rows))
    if page["total"] > len(rows):
        click.echo(f"({len(rows)} of {page['total']}; --limit shows more)")


@main.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON.")
@click.option("--spec", is_flag=True, help="Print the version's spec JSON (a --target file).")
@click.pass_context
def show(ctx: click.Context, ref: str, as_json: bool, spec: bool) -> None:
    """A model (its versions and aliases), or one version with REF like name:3 / name@prod."""
    client = _settings(ctx).client()
    if spec or _is_versioned(ref):
        version = client.version(ref)
        if spec:
            _echo_json(version.spec)
        elif as_json:
            _echo_json(dataclasses.asdict(version))
        else:
            click.echo(_render_version(version))
        return
    model = client.get_model(ref)
    if as_json:
        _echo_json(model)
        return
    click.echo(_render_model(model))


def _render_model(model: dict[str, Any]) -> str:
    lines = [f"model:   {model['namespace']}/{model['name']}"]
    if model.get("description"):
        lines.append(f"about:   {model['description']}")
    if model.get("tags"):
        lines.append(f"tags:    {', '.join(model['tags'])}")
    aliases = model.get("aliases") or {}
    if aliases:
        lines.append("aliases: " + ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())))
    rows = [
        [
            v["version"],
            ",".join(v.get("aliases") or []) or "-",
            v["digest"][:12],
            v["tensor_count"],
            _human_count(v["param_count"]),
            _human_bytes(v["size"]),
            v["source_format"],
            str(v.get("created_at", ""))[:19].replace("T", " "),
        ]
        for v in model.get("versions") or []
    ]
    if rows:
        headers = ["VERSION", "ALIASES", "DIGEST", "TENSORS", "PARAMS", "SIZE", "FORMAT", "CREATED"]
        lines += ["", _table(headers, rows)]
    return "\n".join(lines)


def _render_version(version: Version) -> str:
    ingest = version.ingest
    lines = [
        f"version:  {version.ref}",
        f"aliases:  {', '.join(version.aliases) or '-'}",
        f"digest:   sha256:{version.digest}",
        f"arch_fp:  {version.arch_fp}",
        f"shape_fp: {version.shape_fp}",
        f"tensors:  {version.tensor_count} ({_human_count(version.param_count)} params, "
        f"{_human_bytes(version.size)})",
        f"format:   {version.source_format}"
        + (f", weights from '{ingest['state_dict_key']}'" if ingest.get("state_dict_key") else ""),
    ]
    if ingest.get("dtypes"):
        lines.append("dtypes:   " + ", ".join(f"{k} x{n}" for k, n in ingest["dtypes"].items()))
    if ingest.get("wrapper_prefixes"):
        lines.append(f"prefixes: {' '.join(ingest['wrapper_prefixes'])} (stripped when fitting)")
    if ingest.get("dropped"):
        lines.append(f"dropped:  {', '.join(ingest['dropped'])}")
    if version.created_by or version.created_at:
        lines.append(
            f"created:  {version.created_at[:19].replace('T', ' ')} by {version.created_by}"
        )
    if version.metadata:
        lines.append("metadata: " + json.dumps(version.metadata, sort_keys=True))
    return "\n".join(lines)


@main.command()
@click.argument("name")
@click.argument("alias")
@click.argument("version", type=click.IntRange(min=1))
@click.pass_context
def alias(ctx: click.Context, name: str, alias: str, version: int) -> None:
    """Point ALIAS (e.g. prod) of model NAME at VERSION."""
    result = _settings(ctx).client().set_alias(name, alias, version)
    click.echo(f"{result['model']}@{result['alias']} -> {result['version']}")


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON.")
@click.option(
    "--builtin", is_flag=True, help="List the built-in recipes (they apply by themselves)."
)
@click.pass_context
def adapters(ctx: click.Context, as_json: bool, builtin: bool) -> None:
    """List registered adapters (`adapters add FILE.json` registers one)."""
    if ctx.invoked_subcommand is not None:
        return
    client = _settings(ctx).client()
    items = client.builtin_recipes() if builtin else client.adapters()
    if as_json:
        _echo_json(items)
        return
    if builtin:
        rows = [[r["name"], r["version"], len(r["rules"]), r["description"][:70]] for r in items]
        click.echo(_table(["NAME", "VERSION", "RULES", "DESCRIPTION"], rows))
        return
    if not items:
        click.echo("no adapters", err=True)
        return
    rows = [
        [
            a["name"],
            a["version"],
            ", ".join(f"{k}={v[:12]}" for k, v in (a.get("scope") or {}).items() if v) or "-",
            len(a.get("rules") or []),
            (a.get("description") or "")[:50],
        ]
        for a in items
    ]
    click.echo(_table(["NAME", "VERSION", "SCOPE", "RULES", "DESCRIPTION"], rows))


@adapters.command(name="add")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_context
def adapters_add(ctx: click.Context, file: Path) -> None:
    """Register the adapter in FILE (JSON: name, description, scope, rules)."""
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{file}: not valid JSON: {exc}", param_hint="FILE") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{file}: must hold a JSON object", param_hint="FILE")
    result = _settings(ctx).client().register_adapter(data)
    click.echo(f"registered adapter {result['name']} version {result['version']}")


@main.command(name="inspect")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--spec", is_flag=True, help="Print the spec JSON that --target accepts.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--tensors", is_flag=True, help="List every tensor.")
@click.option("--ema", is_flag=True, help="Describe the EMA weights of a training snapshot.")
def inspect_command(file: Path, spec: bool, as_json: bool, tensors: bool, ema: bool) -> None:
    """What is in a checkpoint FILE (local; nothing in it is executed)."""
    report = inspect_checkpoint(file, ema=ema)
    if spec:
        _echo_json(report.spec)
    elif as_json:
        _echo_json(report.to_json())
    else:
        click.echo(render_report(report, list_tensors=tensors))


def render_report(report: CheckpointReport, *, list_tensors: bool = False) -> str:
    lines = [
        f"file:       {report.path} ({report.format}, {_human_bytes(report.size)})",
    ]
    if report.is_snapshot:
        lines.append(
            f"snapshot:   training snapshot; top-level keys: {', '.join(report.snapshot_keys)}"
        )
        lines.append(f"weights:    from '{report.state_dict_key}'")
        if report.ema_keys:
            lines.append(f"ema:        {', '.join(report.ema_keys)} (push --ema stores it)")
        if report.dropped:
            lines.append(f"dropped:    {', '.join(report.dropped)} (not stored)")
        for key, value in report.extra.items():
            lines.append(f"  {key} = {value}")
    else:
        lines.append("snapshot:   no (a plain state_dict)")
    prefixes = report.wrapper_prefixes
    if prefixes:
        origins = ", ".join(f"{p} ({WRAPPER_ORIGINS.get(p, 'wrapper')})" for p in prefixes)
        lines.append(f"prefixes:   {origins}; the planner strips them")
    else:
        lines.append("prefixes:   none")
    lines += [
        f"tensors:    {report.tensor_count}",
        f"parameters: {report.param_count:,} ({_human_count(report.param_count)})",
        "dtypes:     " + ", ".join(f"{k} x{n}" for k, n in report.dtypes.items()),
        f"arch_fp:    {report.arch_fp}",
        f"shape_fp:   {report.shape_fp}",
    ]
    if report.spec["tie_groups"]:
        groups = "; ".join(" = ".join(g) for g in report.spec["tie_groups"])
        lines.append(f"tied:       {groups}")
    if report.metadata:
        lines.append(f"metadata:   {', '.join(sorted(report.metadata))}")
    if list_tensors:
        rows = [
            [t["key"], "x".join(str(d) for d in t["shape"]) or "scalar", t["dtype"]]
            for t in report.spec["tensors"]
        ]
        lines += ["", _table(["KEY", "SHAPE", "DTYPE"], rows)]
    return "\n".join(lines)


@main.command()
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--all", "show_all", is_flag=True, help="List exact copies too.")
@policy_options
@click.pass_context
def diff(ctx: click.Context, a: str, b: str, as_json: bool, show_all: bool, **kwargs: Any) -> None:
    """What differs between A and B (refs or checkpoint files).

    With a ref for A, the server plans A onto B's spec (B: a ref, a file, or
    module.path:callable): exactly what fetching A into B would do. With a file for A the
    comparison is local: keys, shapes and dtypes.
    """
    policy = _policy(kwargs)
    settings = _settings(ctx)
    b_spec = _spec_of_operand(settings, b)
    if Path(a).expanduser().is_file():
        a_spec = inspect_checkpoint(Path(a).expanduser()).spec
        result = diff_specs(a_spec, b_spec)
        if as_json:
            _echo_json(result)
        else:
            click.echo(render_spec_diff(result, a, b))
        return
    plan_ = settings.client().plan(a, target=b_spec, **policy)
    if as_json:
        _echo_json({"plan_id": plan_.plan_id, **plan_.raw})
        return
    table = render_plan(plan_, b_spec, show_all=show_all)
    click.echo("\n\n".join(p for p in (f"{a} -> {b}", table, render_summary(plan_)) if p))


def _spec_of_operand(settings: Settings, value: str) -> dict[str, Any]:
    path = Path(value).expanduser()
    if path.is_file():
        return inspect_checkpoint(path).spec if path.suffix != ".json" else spec_of(path)
    if CALLABLE_TARGET.match(value) and not _is_versioned(value):
        return spec_of(resolve_target(value))
    version = settings.client().version(value)
    assert version.spec is not None
    return version.spec


def diff_specs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Keys only in ``a`` or ``b`` and shape and dtype differences, compared after each side's
    wrapper prefixes (``module.``, ``_orig_mod.``) are stripped, as the planner strips them."""
    prefixes = {
        "a": wrapper_prefixes(t["key"] for t in a["tensors"]),
        "b": wrapper_prefixes(t["key"] for t in b["tensors"]),
    }
    a_by = _strip(a, "".join(prefixes["a"]))
    b_by = _strip(b, "".join(prefixes["b"]))
    common = [k for k in a_by if k in b_by]
    return {
        "only_in_a": [k for k in a_by if k not in b_by],
        "only_in_b": [k for k in b_by if k not in a_by],
        "shape": [
            {"key": k, "a": a_by[k]["shape"], "b": b_by[k]["shape"]}
            for k in common
            if list(a_by[k]["shape"]) != list(b_by[k]["shape"])
        ],
        "dtype": [
            {"key": k, "a": a_by[k]["dtype"], "b": b_by[k]["dtype"]}
            for k in common
            if a_by[k]["dtype"] != b_by[k]["dtype"]
        ],
        "same": len(common),
        "prefixes": prefixes,
        "arch_fp": {"a": arch_fp(a), "b": arch_fp(b)},
    }


def _strip(spec: dict[str, Any], prefix: str) -> dict[str, dict[str, Any]]:
    return {t["key"].removeprefix(prefix): t for t in spec["tensors"]}


def render_spec_diff(result: dict[str, Any], a: str, b: str) -> str:
    lines = [f"--- {a}", f"+++ {b}"]
    same_arch = result["arch_fp"]["a"] == result["arch_fp"]["b"]
    lines.append(
        f"arch_fp: {'same' if same_arch else 'differs'} ({result['same']} keys in both sides)"
    )
    for side in ("a", "b"):
        if result["prefixes"][side]:
            wrappers = " ".join(result["prefixes"][side])
            lines.append(
                f"{side}: wrapper prefix {wrappers} (stripped to compare, as the planner does)"
            )
    lines += [f"- {k}" for k in result["only_in_a"]]
    lines += [f"+ {k}" for k in result["only_in_b"]]
    lines += [f"~ {d['key']}: shape {d['a']} -> {d['b']}" for d in result["shape"]]
    lines += [f"~ {d['key']}: dtype {d['a']} -> {d['b']}" for d in result["dtype"]]
    if not any(result[k] for k in ("only_in_a", "only_in_b", "shape", "dtype")):
        lines.append("no differences in keys, shapes or dtypes")
    else:
        lines.append("(a local comparison; push A and diff refs to see how the planner maps it)")
    return "\n".join(lines)


@main.command()
@target_option(required=True)
@click.option("--limit", type=click.IntRange(1, 100), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON.")
@policy_options
@click.pass_context
def find(ctx: click.Context, target: Any, limit: int, as_json: bool, **kwargs: Any) -> None:
    """Stored versions that fit --target, best first."""
    policy = _policy(kwargs)
    hits = _settings(ctx).client().find_compatible(target, limit=limit, **policy)
    if as_json:
        _echo_json(hits)
        return
    if not hits:
        click.echo("no compatible versions", err=True)
        return
    rows = [
        [h["ref"], h["verdict"], f"{h['coverage']['params']['fraction'] * 100:.1f}%"] for h in hits
    ]
    click.echo(_table(["REF", "VERDICT", "PARAMS LOADED"], rows))


@main.group()
def token() -> None:
    """Bearer tokens: create, list, revoke (needs an admin scope)."""


@token.command(name="create")
@click.argument("name")
@click.option(
    "--scope",
    "-s",
    "scopes",
    multiple=True,
    required=True,
    help="action:pattern, repeatable: read|write|admin over *, NS/* or NS/NAME.",
)
@click.option("--expires", help="ISO 8601 time after which the token stops working.")
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON.")
@click.pass_context
def token_create(
    ctx: click.Context, name: str, scopes: tuple[str, ...], expires: str | None, as_json: bool
) -> None:
    """Create token NAME; its value is printed once, on stdout."""
    settings = _settings(ctx)
    created = settings.client().create_token(name, list(scopes), expires_at=expires)
    if as_json:
        _echo_json(created)
        return
    click.echo(created["token"])
    if not settings.quiet:
        click.echo(
            f"token {created['id']} ({created['prefix']}...) {', '.join(created['scopes'])}: "
            "store the value now, it is not shown again",
            err=True,
        )


@token.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON.")
@click.pass_context
def token_list(ctx: click.Context, as_json: bool) -> None:
    """Tokens you administer (never their values)."""
    items = _settings(ctx).client().tokens()
    if as_json:
        _echo_json(items)
        return
    rows = [
        [
            t["id"],
            t["name"],
            f"{t['prefix']}...",
            "revoked" if t["revoked_at"] else "active",
            (t["last_used_at"] or "-")[:19],
            " ".join(t["scopes"]),
        ]
        for t in items
    ]
    click.echo(_table(["ID", "NAME", "PREFIX", "STATE", "LAST USED", "SCOPES"], rows))


@token.command(name="revoke")
@click.argument("token_id", type=click.IntRange(min=1))
@click.pass_context
def token_revoke(ctx: click.Context, token_id: int) -> None:
    """Revoke token TOKEN_ID (see `token list`)."""
    revoked = _settings(ctx).client().revoke_token(token_id)
    click.echo(f"revoked token {revoked['id']} ({revoked['name']}, {revoked['prefix']}...)")


@main.command()
@click.option("--dry-run", is_flag=True, help="Report what would be deleted; delete nothing.")
@click.option(
    "--grace",
    type=click.IntRange(min=0),
    help="Only what is older than this many seconds [server default: STATEHUB_GC_GRACE_S].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON.")
@click.pass_context
def gc(ctx: click.Context, dry_run: bool, grace: int | None, as_json: bool) -> None:
    """Delete blobs no version references and stale upload temp files (admin:*)."""
    report = _settings(ctx).client().gc(dry_run=dry_run, grace_s=grace)
    if as_json:
        _echo_json(report)
        return
    verb = "would delete" if report["dry_run"] else "deleted"
    click.echo(
        f"{verb} {len(report['blobs_deleted'])} blob(s), "
        f"{_human_bytes(report['bytes_freed'])}, "
        f"{len(report['temp_files_deleted'])} temp file(s); kept {report['blobs_kept']} blob(s)"
    )
    evicted = report.get("fit_cache_evicted", 0)  # absent from older servers
    if evicted:
        verb = "would evict" if report["dry_run"] else "evicted"
        click.echo(f"{verb} {evicted} unused fit cache entr{'y' if evicted == 1 else 'ies'}")
    composed = report.get("composed_files_deleted", 0)  # absent from older servers
    if composed:
        verb = "would delete" if report["dry_run"] else "deleted"
        click.echo(f"{verb} {composed} composed file(s) no version names")


@main.group()
def cache() -> None:
    """The local cache of fetched and pulled bodies [env STATEHUB_CACHE, ~/.cache/statehub]."""


def _local_cache() -> Cache:
    return Cache.from_env()


@cache.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cache_ls(as_json: bool) -> None:
    """What the cache answers, most recently used first."""
    local = _local_cache()
    entries = local.entries()
    if as_json:
        _echo_json([dataclasses.asdict(entry) for entry in entries])
        return
    if not entries:
        click.echo(f"the cache at {local.root} is empty", err=True)
        return
    rows = [
        [e.ref, e.kind, _human_bytes(e.size), e.digest[:12], _ago(e.last_used)] for e in entries
    ]
    click.echo(_table(["REF", "KIND", "SIZE", "DIGEST", "USED"], rows))
    click.echo(
        f"{_human_bytes(local.size())} in {local.root} "
        f"(bound {_human_bytes(local.max_bytes)}, STATEHUB_CACHE_MAX_BYTES)",
        err=True,
    )


@cache.command(name="prune")
@click.option(
    "--max-bytes",
    type=click.IntRange(min=0),
    help="Keep at most this many bytes [default: STATEHUB_CACHE_MAX_BYTES, 50 GiB].",
)
def cache_prune(max_bytes: int | None) -> None:
    """Evict the least recently used bodies down to the bound."""
    freed = _local_cache().prune(max_bytes)
    click.echo(f"freed {_human_bytes(freed)}")


@cache.command(name="verify")
def cache_verify() -> None:
    """Hash every cached body again; drop (and name) the ones that no longer match."""
    bad = _local_cache().verify()
    for digest in bad:
        click.echo(f"dropped {digest}: its bytes no longer hash to it", err=True)
    click.echo(f"{len(bad)} corrupted bod{'y' if len(bad) == 1 else 'ies'} dropped")
    if bad:
        raise click.exceptions.Exit(1)


@cache.command(name="clear")
def cache_clear() -> None:
    """Remove every cached body."""
    freed = _local_cache().clear()
    click.echo(f"freed {_human_bytes(freed)}")


def _ago(timestamp: float) -> str:
    seconds = max(0.0, time.time() - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


if __name__ == "__main__":
    main()
