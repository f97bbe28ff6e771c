"""The CI gate: does a plan meet a requirement, and the JUnit report that says so.

Verdicts rank ``incompatible < partial < adapted < exact``; a plan passes when its verdict
ranks at least as high as the requirement. ``--allow-missing`` patterns (globs over target
keys) excuse ``keep_target`` keys: a plan whose only kept keys are excused counts as
``adapted`` (or ``exact``, when every other key loads as stored and the only checkpoint keys
left over match the patterns too: ``--require exact --allow-missing 'fc.*'`` reads "exact,
but for a new head").
"""

from __future__ import annotations

import fnmatch
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from statehub._models import Plan, PlanEntry

VERDICT_RANK = {"incompatible": 0, "partial": 1, "adapted": 2, "exact": 3}
REQUIREMENTS = ("exact", "adapted", "partial")


@dataclass(frozen=True)
class GateResult:
    """The gate's decision about one plan."""

    ref: str
    plan: Plan
    required: str
    effective: str
    excused: list[str]
    failing: list[str]

    @property
    def passed(self) -> bool:
        return VERDICT_RANK[self.effective] >= VERDICT_RANK[self.required]

    @property
    def summary(self) -> str:
        verdict = self.plan.verdict
        shown = verdict if self.effective == verdict else f"{verdict} (counted as {self.effective})"
        outcome = "passes" if self.passed else "fails"
        return f"verdict {shown} {outcome} --require {self.required}"

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "passed": self.passed,
            "verdict": self.plan.verdict,
            "effective_verdict": self.effective,
            "required": self.required,
            "allowed_missing": self.excused,
            "failing": self.failing,
            "reasons": self.plan.reasons,
            "warnings": self.plan.warnings,
            "coverage": self.plan.coverage,
            "plan_id": self.plan.plan_id,
            "plan": self.plan.raw,
        }


def loads_as_stored(entry: PlanEntry) -> bool:
    """The entry is the stored tensor under its own name, unchanged."""
    return (
        entry.action == "copy"
        and entry.stage == "exact"
        and entry.source == entry.target
        and entry.tied_to is None
    )


def matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def evaluate(
    plan: Plan, *, ref: str, require: str = "adapted", allow_missing: Sequence[str] = ()
) -> GateResult:
    """Decide whether ``plan`` meets ``require``, excusing kept keys matched by ``allow_missing``.

    Args:
        plan: the server's plan.
        ref: what was checked (for reports).
        require: ``exact``, ``adapted`` or ``partial``.
        allow_missing: glob patterns over target keys that may keep the target's values.

    Returns:
        The :class:`GateResult`; ``failing`` names the target keys that stop it passing.

    Raises:
        ValueError: an unknown requirement.
    """
    if require not in REQUIREMENTS:
        raise ValueError(f"--require must be one of {', '.join(REQUIREMENTS)}, not {require!r}")
    excused = [
        e.target
        for e in plan.entries
        if e.action == "keep_target" and matches(e.target, allow_missing)
    ]
    rest = [e for e in plan.entries if e.target not in set(excused)]
    effective = _effective(plan, rest, allow_missing)
    failing: list[str] = []
    if require == "exact":
        failing = [e.target for e in rest if not loads_as_stored(e)]
    elif require == "adapted":
        failing = [e.target for e in rest if e.action == "keep_target"]
    return GateResult(ref, plan, require, effective, excused, failing)


def _effective(plan: Plan, rest: list[PlanEntry], allow_missing: Sequence[str]) -> str:
    if plan.verdict == "incompatible":
        return "incompatible"
    # Checkpoint keys left over under an allowed pattern are the replaced part (the old head).
    unused = [k for k in plan.unused if not matches(k, allow_missing)]
    if all(loads_as_stored(e) for e in rest) and not unused and not plan.dropped:
        computed = "exact"
    elif not any(e.action == "keep_target" for e in rest):
        computed = "adapted"
    else:
        computed = "partial"
    return max(computed, plan.verdict, key=VERDICT_RANK.__getitem__)


def junit_xml(result: GateResult) -> str:
    """A JUnit report: one ``verdict`` testcase, then one testcase per target key.

    Keys that stop the gate passing carry a ``<failure>``; excused kept keys are
    ``<skipped>``. CI systems render it as a test run of the checkpoint.
    """
    plan = result.plan
    classname = f"statehub.check.{result.ref}"
    suite = ET.Element(
        "testsuite",
        name=f"statehub check {result.ref}",
        tests=str(1 + len(plan.entries)),
        failures=str((0 if result.passed else 1) + len(result.failing)),
        skipped=str(len(result.excused)),
        errors="0",
    )
    properties = ET.SubElement(suite, "properties")
    for name, value in (
        ("ref", result.ref),
        ("verdict", plan.verdict),
        ("effective_verdict", result.effective),
        ("required", result.required),
        ("plan_id", plan.plan_id),
        ("params_fraction", str(plan.coverage.get("params", {}).get("fraction", ""))),
    ):
        ET.SubElement(properties, "property", name=name, value=value)
    verdict_case = ET.SubElement(suite, "testcase", classname=classname, name="verdict")
    if not result.passed:
        failure = ET.SubElement(
            verdict_case, "failure", message=result.summary, type=f"verdict.{plan.verdict}"
        )
        failure.text = _failure_text(result)
    failing = set(result.failing)
    excused = set(result.excused)
    for entry in plan.entries:
        case = ET.SubElement(suite, "testcase", classname=classname, name=entry.target)
        if entry.target in failing:
            failure = ET.SubElement(
                case, "failure", message=describe_entry(entry), type=f"action.{entry.action}"
            )
            failure.text = f"required: {result.required}\n{describe_entry(entry)}"
        elif entry.target in excused:
            ET.SubElement(case, "skipped", message="keep_target allowed by --allow-missing")
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _failure_text(result: GateResult) -> str:
    lines = [result.summary]
    lines += [f"reason: {r}" for r in result.plan.reasons]
    if result.failing:
        lines.append(f"{len(result.failing)} key(s) fail: {', '.join(result.failing[:20])}")
    lines += [f"warning: {w}" for w in result.plan.warnings]
    return "\n".join(lines)


def describe_entry(entry: PlanEntry) -> str:
    """One line: ``fc.weight <- fc.weight (transform: slice) [shape_ops]``."""
    if entry.action == "keep_target":
        return f"{entry.target}: keeps the target's own value [{entry.stage}] {entry.rule}".strip()
    ops = ", ".join(str(op.get("op", op)) for op in entry.ops)
    how = f"{entry.action}: {ops}" if ops else entry.action
    return f"{entry.target} <- {entry.source} ({how}) [{entry.stage}] {entry.rule}".strip()
