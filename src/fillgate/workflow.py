"""The production workflow's guards: four-eyes approval and rehearsal on another target.

A target may declare, in ``fillgate.toml``:

``approvals = N``
    an apply there needs N approvals of the very plan file (its SHA-256, the one its plan run
    recorded) from operators other than the one applying (``fillgate approve PLAN``).
``rehearse_on = "staging"``
    an apply or run of a job there needs a succeeded apply of the same job (same code
    fingerprint, same parameters) on that target, read from that target's own ledger through
    its own configuration; ``rehearsal_tolerance = 0.2`` also refuses a plan whose counts of
    a kind differ from the rehearsal plan's by more than 20%. Only ``--skip-rehearsal
    --confirm ENV`` overrides it, and the apply run records that it did.

Both refuse with exit 3 before anything is written; what passed is recorded in the apply
run's arguments (``approvals``, ``rehearsal``) and shown by ``fillgate show``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from shlex import quote
from typing import Any

from fillgate.config import Target
from fillgate.errors import ApprovalRequiredError, FillgateError, RehearsalRequiredError
from fillgate.ledger import Run, operator_name
from fillgate.stamp import Connected, connect

COMPARED_COUNTS = ("writes", "inserts", "disagreements", "preserved", "errors", "unexpected_index")
"""The counts of a plan that the rehearsal check compares (per kind of finding)."""


# --- approvals ---------------------------------------------------------------------------------


def approvals_counted(approvals: list[dict[str, Any]], sha256: str, applier: str) -> list[dict[str, Any]]:
    """The approvals that count for ``applier``: of this exact file, by other operators."""
    return [a for a in approvals if a["plan_sha256"] == sha256 and a["operator"] != applier]


def check_approvals(conn: Connected, plan_id: str, sha256: str, path: str) -> list[dict[str, Any]]:
    """The target's ``approvals``: enough approvals of this plan file by operators other than
    the one applying, or ApprovalRequiredError. Returns the approvals counted (for the run)."""
    needed = conn.target.approvals
    if not needed:
        return []
    applier = operator_name()
    recorded = conn.ledger.approvals(plan_id)
    counted = approvals_counted(recorded, sha256, applier)
    if len(counted) >= needed:
        return [{"operator": a["operator"], "via": a["via"], "comment": a["comment"],
                 "at": a["created_at"].isoformat() + "Z"} for a in counted]
    have = ", ".join(a["operator"] for a in counted) or "none"
    own = " (your own approval does not count)" if any(a["operator"] == applier for a in recorded) else ""
    missing = needed - len(counted)
    raise ApprovalRequiredError(
        f"target '{conn.target.name}' needs {needed} approval{'s' if needed != 1 else ''} of plan {plan_id} "
        f"(sha256 {sha256}) from operators other than you ({applier}); it has {len(counted)}: {have}{own}. "
        f"{missing} more needed. Nothing was written. Another operator approves it with: fillgate approve {path}"
    )


def check_reviewed_only(conn: Connected, what: str) -> None:
    """A target that needs approvals takes reviewed plan files only: ``what`` (``fillgate run``,
    a pipeline) plans and applies in one go, so nobody could have approved its plans."""
    needed = conn.target.approvals
    if needed:
        raise ApprovalRequiredError(
            f"target '{conn.target.name}' needs {needed} approval{'s' if needed != 1 else ''} of a plan from other "
            f"operators, so {what} (plan and apply in one go) cannot write to it. Nothing was written. Plan: "
            f"fillgate plan JOB --target {conn.target.name} -o FILE; another operator approves: "
            "fillgate approve FILE; then: fillgate apply FILE"
        )


# --- rehearsal ---------------------------------------------------------------------------------


@dataclass
class Rehearsal:
    """The rehearsal an apply relies on (or its override), as recorded in the apply run."""

    target: str
    run_id: str | None = None
    plan_id: str | None = None
    counts: dict[str, int] | None = None
    differences: dict[str, list[int]] | None = None
    tolerance: float | None = None
    skipped: bool = False

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _canonical(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)


def _plan_identity(ledger_run: Run, plan: Run | None) -> tuple[str | None, str]:
    """(code fingerprint, parameters) a succeeded apply applied, from its own arguments or its plan run's."""
    fingerprint = ledger_run.args.get("job_fingerprint") or (plan.args.get("job_fingerprint") if plan else None)
    params = ledger_run.args["params"] if "params" in ledger_run.args else (plan.args.get("params") if plan else None)
    return fingerprint, _canonical(params or {})


def _rehearsal_conn(target: Target) -> Connected:
    assert target.rehearsal is not None
    try:
        return connect(target.rehearsal.resolve())
    except FillgateError as exc:
        raise RehearsalRequiredError(
            f"target '{target.name}' is rehearsed on '{target.rehearse_on}', whose ledger cannot be read: {exc} "
            "Nothing was written."
        ) from None


def rehearse_command(target: Target, spec: str | None, params: dict[str, Any]) -> str:
    """The command that rehearses the job on the target's rehearsal target."""
    options = "".join(f" --param {quote(f'{k}={v}')}" for k, v in sorted(params.items()))
    return f"fillgate run {quote(spec) if spec else 'JOB'} --target {target.rehearse_on}{options}"


def find_rehearsal(target: Target, job: str, fingerprint: str, params: dict[str, Any],
                   spec: str | None = None) -> tuple[Run, Run | None]:
    """The newest succeeded apply of ``job`` (same code, same parameters) on the target's
    rehearsal target, and its plan run; or RehearsalRequiredError saying what is missing."""
    where = _rehearsal_conn(target)
    wanted = _canonical(params)
    near: list[str] = []
    for applied in where.ledger.succeeded_applies(job):
        plan = where.ledger.get_run(applied.parent_run_id) if applied.parent_run_id else None
        found_fp, found_params = _plan_identity(applied, plan)
        if found_fp == fingerprint and found_params == wanted:
            return applied, plan
        near.append(f"run {applied.run_id} (code {found_fp or 'unknown'}, parameters {found_params})")
    seen = f" Its succeeded applies of {job} differ: {'; '.join(near[:3])}." if near else \
        f" It has no succeeded apply of {job}."
    raise RehearsalRequiredError(
        f"target '{target.name}' needs job {job} (code {fingerprint}, parameters {wanted}) applied successfully "
        f"on its rehearsal target '{target.rehearse_on}' first.{seen} Nothing was written. Rehearse it with: "
        f"{rehearse_command(target, spec, params)}; or override with "
        f"--skip-rehearsal --confirm {target.environment}"
    )


def compare_counts(planned: dict[str, int], rehearsed: dict[str, int]) -> dict[str, list[int]]:
    """Per compared kind: [this plan's count, the rehearsal plan's count]."""
    return {kind: [int(planned.get(kind, 0)), int(rehearsed.get(kind, 0))] for kind in COMPARED_COUNTS}


def outside_tolerance(differences: dict[str, list[int]], tolerance: float) -> list[str]:
    """The kinds whose counts differ by more than ``tolerance`` times the rehearsal's count."""
    return [f"{kind} {mine} vs {theirs}" for kind, (mine, theirs) in differences.items()
            if abs(mine - theirs) > tolerance * theirs]


def check_rehearsal(
    conn: Connected, job: str, fingerprint: str, params: dict[str, Any], counts: dict[str, int] | None,
    *, skip: bool = False, confirm: str | None = None, spec: str | None = None,
) -> Rehearsal | None:
    """The target's ``rehearse_on``: the rehearsal found (and, with the plan's ``counts``,
    compared within ``rehearsal_tolerance``), its recorded override, or RehearsalRequiredError."""
    target = conn.target
    if target.rehearse_on is None:
        return None
    if skip:
        if confirm != target.environment:
            raise RehearsalRequiredError(
                f"--skip-rehearsal on target '{target.name}' needs --confirm {target.environment} typed out. "
                "Nothing was written."
            )
        return Rehearsal(target=target.rehearse_on, skipped=True)
    applied, plan = find_rehearsal(target, job, fingerprint, params, spec)
    found = Rehearsal(target=target.rehearse_on, run_id=applied.run_id, plan_id=applied.parent_run_id,
                      tolerance=target.rehearsal_tolerance)
    if counts is None or plan is None:
        return found
    found.counts = {k: int(v) for k, v in plan.counts.items() if k in COMPARED_COUNTS}
    found.differences = compare_counts(counts, plan.counts)
    if target.rehearsal_tolerance is not None:
        off = outside_tolerance(found.differences, target.rehearsal_tolerance)
        if off:
            raise RehearsalRequiredError(
                f"the plan's counts differ from rehearsal run {applied.run_id} on '{target.rehearse_on}' (plan "
                f"{plan.run_id}) by more than rehearsal_tolerance {target.rehearsal_tolerance:g}: {', '.join(off)} "
                f"(this plan vs the rehearsal). Nothing was written. Review the plan; override with "
                f"--skip-rehearsal --confirm {target.environment}"
            )
    return found
