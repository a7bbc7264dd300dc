"""Environment stamps and the guards around them: ``init``, the stamp check every command
makes, and the typed confirmation a protected environment needs before any write."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.engine import Engine

from fillgate import stampread
from fillgate.config import Target
from fillgate.database import check_reachable, missing_database_file
from fillgate.errors import ProtectedTargetError
from fillgate.ledger import Ledger, Run, new_run_id, operator_name, utcnow
from fillgate.runs import RunKind, RunStatus


@dataclass
class Connected:
    """A target whose database was reached and whose stamp was checked."""

    target: Target
    engine: Engine
    ledger: Ledger
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def database_id(self) -> str:
        return self.meta.get("database_id", "")


def check_stamp(target: Target, meta: dict[str, str]) -> None:
    """The database's stamp (its ``meta``) must be the target's environment."""
    stampread.check_stamp(target.name, target.environment, meta.get("environment"))


def check_write_allowed(target: Target, confirm: str | None, what: str = "write to") -> None:
    """A protected environment takes writes only with ``--confirm <environment>``."""
    if target.protected and confirm != target.environment:
        hint = "" if confirm is None else f" (--confirm {confirm!r} does not match)"
        raise ProtectedTargetError(
            f"target '{target.name}' is the protected environment '{target.environment}'; "
            f"refusing to {what} it without typed confirmation{hint}. Nothing was written. "
            f"Re-run with --confirm {target.environment}"
        )


def connect(target: Target) -> Connected:
    """Reach ``target``, require its ledger, and check its stamp."""
    engine = check_reachable(target)
    ledger = Ledger(engine)
    meta = ledger.require_meta(target.name)
    check_stamp(target, meta)
    return Connected(target, engine, ledger, meta)


@dataclass
class InitResult:
    target: str
    environment: str
    database_id: str
    created: bool
    stamped: bool
    previous_environment: str | None
    run_id: str | None

    @property
    def changed(self) -> bool:
        return self.created or self.stamped


def init_target(
    target: Target, *, force_stamp: bool = False, confirm: str | None = None
) -> InitResult:
    """Create or upgrade the ledger and stamp the database with the target's environment.

    Re-running is a no-op. ``force_stamp`` is the only way to change an existing stamp; the
    change is recorded as a run. Writes to a protected environment (or re-stamping a
    database stamped as one) need ``confirm``.
    """
    if missing_database_file(target) is not None:  # init would create the file: a write like any other
        check_write_allowed(target, confirm, "initialize")
    engine = check_reachable(target, create=True)
    ledger = Ledger(engine)
    needs_upgrade = ledger.current_revision() != ledger.head_revision()
    meta = ledger.read_meta() if not needs_upgrade or ledger.is_initialized() else {}
    previous = meta.get("environment")
    if previous is not None and previous != target.environment and not force_stamp:
        check_stamp(target, meta)
    restamp = previous is not None and previous != target.environment
    if needs_upgrade or previous is None or restamp:
        check_write_allowed(target, confirm, "initialize")
    if restamp and previous in target.protected_environments and confirm != previous:
        raise ProtectedTargetError(
            f"the database of target '{target.name}' is stamped with the protected environment "
            f"'{previous}'; re-stamping it as '{target.environment}' needs --confirm {previous}. "
            "Nothing was changed."
        )
    created = ledger.upgrade()
    run_id = _stamp(ledger, target, meta, previous) if previous is None or restamp else None
    return InitResult(
        target=target.name,
        environment=target.environment,
        database_id=ledger.read_meta()["database_id"],
        created=created,
        stamped=run_id is not None,
        previous_environment=previous,
        run_id=run_id,
    )


def _stamp(ledger: Ledger, target: Target, meta: dict[str, str], previous: str | None) -> str:
    """Write the target's environment into the database (and its fingerprint, the first time),
    recorded as an init or stamp run in the same transaction; returns the run's id."""
    run_id = new_run_id()
    now = utcnow()
    values = {"environment": target.environment, "stamped_at": now.isoformat() + "Z", "stamped_by": operator_name()}
    if "database_id" not in meta:
        values["database_id"] = new_run_id()
    with ledger.engine.begin() as conn:
        ledger.write_meta(conn, values)
        ledger.create_run(Run(
            run_id=run_id, kind=RunKind.INIT if previous is None else RunKind.STAMP, target=target.name,
            environment=target.environment, operator=operator_name(), status=RunStatus.SUCCEEDED,
            args={"from": previous, "to": target.environment}, started_at=now, finished_at=now,
        ), conn)
    return run_id
