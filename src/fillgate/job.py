"""The Job base class, typed job parameters, and loading a job from ``file.py:Class``."""

from __future__ import annotations

import datetime as dt
import hashlib
import inspect
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fillgate.errors import JobError, UsageError
from fillgate.policy import Policy

if TYPE_CHECKING:
    from fillgate.context import RunContext
    from fillgate.lookup import Lookup
    from fillgate.throttle import HealthCheck

Row = Mapping[str, Any]
Proposal = Mapping[str, Any] | None

_MISSING: Any = object()


class Param:
    """A typed job parameter, set on the command line with ``--param name=value``."""

    _parsers: ClassVar[dict[type, Any]] = {
        str: str,
        int: int,
        float: float,
        bool: lambda raw: _parse_bool(raw),
        dt.date: dt.date.fromisoformat,
        dt.datetime: dt.datetime.fromisoformat,
    }

    def __init__(self, type: type = str, default: Any = _MISSING, help: str = "") -> None:
        if type not in self._parsers:
            raise JobError(
                f"Param type {type!r} is not supported; use one of "
                + ", ".join(t.__name__ for t in self._parsers)
            )
        self.type = type
        self.default = default
        self.help = help

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def parse(self, name: str, raw: Any) -> Any:
        if isinstance(raw, self.type) and not (self.type is int and isinstance(raw, bool)):
            return raw
        try:
            return self._parsers[self.type](str(raw))
        except (ValueError, TypeError):
            raise UsageError(
                f"parameter '{name}' expects {self.type.__name__}, got {raw!r}."
            ) from None


def _parse_bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


class Job:
    """Base class of every job. Subclasses set the class attributes and define
    ``compute(row, ctx)`` or ``compute_batch(rows, ctx)``.

    ``table``     the table the job writes.
    ``key``       the column(s) identifying a row; must match a primary key or unique constraint.
    ``columns``   ``{column: policy}``: the only columns the job may write.
    ``source``    a SQL select yielding the key and the written columns (default: the whole
                  table); fillgate pages through it by key, keyset style. It may use
                  ``:name`` bind parameters filled from the job's parameters.
    ``params``    ``{name: Param(type, default=...)}``.
    ``page_size`` rows read and computed per page.
    ``lookup``    an optional :class:`~fillgate.lookup.Lookup` (or override ``build_lookup``):
                  called once per page; ``compute`` reads the row's aligned result from
                  ``ctx.result``. A misaligned result is never computed from or written.
    ``health_checks``  checks run between batches that can hold the run (see throttle.py).
    ``writes``    ``"update"`` (default): the source's rows are the table's rows and compute
                  proposes new column values. ``"insert"``: compute returns the row(s) that
                  must exist in ``table`` (a dict or a list of dicts holding the key columns
                  and any declared columns); a missing row is inserted, an existing one is
                  left alone. ``"upsert"``: as insert, but an existing row's declared columns
                  are updated under their policies. ``key`` is then the conflict key, verified
                  against the table's primary key or unique constraints at plan time.
    ``source_key``  the column(s) the source is paged by (default: ``key``); needed when
                  the source's rows are not the table's rows (insert and upsert jobs).
    """

    table: ClassVar[str]
    key: ClassVar[Sequence[str]] = ("id",)
    columns: ClassVar[Mapping[str, Policy]] = {}
    source: ClassVar[str | None] = None
    params: ClassVar[Mapping[str, Param | type]] = {}
    page_size: ClassVar[int] = 1000
    name: ClassVar[str | None] = None
    lookup: ClassVar[Lookup | None] = None
    health_checks: ClassVar[Sequence[HealthCheck]] = ()
    writes: ClassVar[str] = "update"
    source_key: ClassVar[Sequence[str] | None] = None

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.args: dict[str, Any] = resolve_params(type(self), params or {})

    def compute(self, row: Row, ctx: RunContext) -> Proposal:
        raise NotImplementedError

    def verify(self, ctx: RunContext, changed_keys: Sequence[tuple[Any, ...]]) -> bool | str | None:
        """Check a canary (``fillgate apply PLAN --canary N``) once it is written: ``changed_keys``
        are the keys of the rows it changed. Return None or True if all is well, False or a
        text saying what is wrong otherwise (raising fails it too). Read through ``ctx``
        (``ctx.execute(sql, **params)``). The default verifies nothing."""
        return None

    def build_lookup(self, ctx: RunContext) -> Lookup | None:
        """The batch lookup of this run (default: the class's ``lookup``); may use ``self.args``."""
        return type(self).lookup

    def compute_batch(self, rows: Sequence[Row], ctx: RunContext) -> Sequence[Proposal | BaseException]:
        """Proposals for ``rows``, one per row, in order. The default calls ``compute``."""
        raise NotImplementedError

    # --- introspection used by the engine -------------------------------------------

    @classmethod
    def job_name(cls) -> str:
        return cls.name or f"{cls.__module__}:{cls.__qualname__}"

    @classmethod
    def key_columns(cls) -> tuple[str, ...]:
        return (cls.key,) if isinstance(cls.key, str) else tuple(cls.key)

    @classmethod
    def paging_key(cls) -> tuple[str, ...]:
        """The columns the source is paged by."""
        if cls.source_key is None:
            return cls.key_columns()
        return (cls.source_key,) if isinstance(cls.source_key, str) else tuple(cls.source_key)

    @classmethod
    def policies(cls) -> dict[str, Policy]:
        out: dict[str, Policy] = {}
        for column, policy in cls.columns.items():
            if isinstance(policy, type) and issubclass(policy, Policy):
                policy = policy()
            out[column] = policy
        return out

    @classmethod
    def has_batch_compute(cls) -> bool:
        return cls.compute_batch is not Job.compute_batch

    @classmethod
    def code_fingerprint(cls) -> str:
        module = sys.modules.get(cls.__module__)
        try:
            text = inspect.getsource(module) if module else inspect.getsource(cls)
        except (OSError, TypeError):
            text = cls.__qualname__
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def spec(cls) -> str:
        """How to load this job again: ``/abs/path/file.py:Class`` or ``module:Class``."""
        try:
            return f"{Path(inspect.getfile(cls)).resolve()}:{cls.__qualname__}"
        except (TypeError, OSError):
            return f"{cls.__module__}:{cls.__qualname__}"

    @classmethod
    def select_sql(cls) -> str:
        return cls.source or f"SELECT * FROM {cls.table}"


def resolve_params(cls: type[Job], given: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``given`` against the job's declared parameters and convert each value."""
    declared = {
        name: spec if isinstance(spec, Param) else Param(spec) for name, spec in cls.params.items()
    }
    unknown = set(given) - set(declared)
    if unknown:
        names = ", ".join(sorted(declared)) or "none"
        raise UsageError(
            f"job {cls.job_name()} has no parameter(s) {', '.join(sorted(unknown))}; "
            f"declared parameters: {names}."
        )
    out: dict[str, Any] = {}
    for name, spec in declared.items():
        if name in given:
            out[name] = spec.parse(name, given[name])
        elif spec.required:
            raise UsageError(
                f"job {cls.job_name()} needs parameter '{name}' ({spec.type.__name__}); "
                f"pass --param {name}=VALUE."
            )
        else:
            out[name] = spec.default
    return out


def parse_param_options(options: Sequence[str]) -> dict[str, str]:
    """Turn repeated ``--param name=value`` options into a dict."""
    out: dict[str, str] = {}
    for option in options:
        name, sep, value = option.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--param expects name=value, got {option!r}.")
        out[name.strip()] = value
    return out


# The longest names the ledger keeps (fillgate_runs.job, which also names the job's apply
# lock, "apply:<job>" in fillgate_locks.name; table_name; column_name). A test holds these
# against the ledger's schema.
NAME_LIMITS = {"job": 185, "table": 128, "column": 128}


def _check_length(spec: str, what: str, name: str) -> None:
    if len(name) > NAME_LIMITS[what]:
        raise JobError(
            f"job {spec}: its {what} name is {len(name)} characters long; fillgate's ledger keeps at most "
            f"{NAME_LIMITS[what]}. " + ("Set a shorter name = \"...\" on the job." if what == "job" else "")
        )


def _names(value: Any) -> bool:
    """A column name, or a list or tuple of them."""
    return isinstance(value, str) or (isinstance(value, list | tuple) and all(isinstance(v, str) for v in value))


def _check_shapes(cls: Any, spec: str) -> None:
    """The attributes the others are read through: key and source_key names, source a SQL string."""
    if not _names(cls.key):
        raise JobError(f"job {spec}: key must be a column name or a tuple of column names, not {cls.key!r}.")
    if cls.source_key is not None and not _names(cls.source_key):
        raise JobError(f"job {spec}: source_key must be a column name or a tuple of column names, "
                       f"not {cls.source_key!r}.")
    if cls.source is not None and (not isinstance(cls.source, str) or not cls.source.strip()):
        raise JobError(f"job {spec}: source must be a SQL SELECT (a non-empty string), not {cls.source!r}.")
    if isinstance(cls.page_size, bool):
        raise JobError(f"job {spec}: page_size must be a positive integer.")


def validate_job_class(cls: Any, spec: str) -> type[Job]:
    """Check that ``cls`` is a complete Job subclass; explain what is missing."""
    if not (isinstance(cls, type) and issubclass(cls, Job)) or cls is Job:
        raise JobError(f"{spec} is not a fillgate Job subclass.")
    table = getattr(cls, "table", None)
    if not isinstance(table, str) or not table:
        shown = "has no table" if table is None or table == "" else f"has table = {table!r}, not a table name"
        raise JobError(f"job {spec} {shown}; set table = \"name\".")
    _check_shapes(cls, spec)
    _check_length(spec, "job", cls.job_name())
    _check_length(spec, "table", table)
    for column in (*cls.key_columns(), *(cls.columns if isinstance(cls.columns, Mapping) else ())):
        if isinstance(column, str):
            _check_length(spec, "column", column)
    keys = cls.key_columns()
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise JobError(f"job {spec}: key must be a column name or a tuple of column names.")
    if cls.writes not in ("update", "insert", "upsert"):
        raise JobError(f"job {spec}: writes must be 'update', 'insert' or 'upsert', not {cls.writes!r}.")
    columns = cls.columns
    if not isinstance(columns, Mapping) or (not columns and cls.writes != "insert"):
        raise JobError(f"job {spec} declares no columns; set columns = {{\"col\": FillMissing()}}.")
    if cls.writes != "update" and cls.source is None:
        raise JobError(
            f"job {spec} writes '{cls.writes}' rows into {table}, so it needs a source "
            "(the SELECT whose rows compute turns into the rows that must exist)."
        )
    if cls.writes == "update" and cls.source_key is not None and cls.paging_key() != keys:
        raise JobError(f"job {spec}: an update job pages its source by its key; remove source_key.")
    for column, policy in cls.policies().items():
        if not isinstance(policy, Policy):
            raise JobError(
                f"job {spec}: column '{column}' has {policy!r}, not a policy "
                "(FillMissing(), Promote(unknown=[...]) or Overwrite())."
            )
        if column in keys:
            raise JobError(f"job {spec}: key column '{column}' cannot also be written.")
    if cls.compute is Job.compute and cls.compute_batch is Job.compute_batch:
        raise JobError(f"job {spec} defines neither compute(row, ctx) nor compute_batch(rows, ctx).")
    if not isinstance(cls.page_size, int) or cls.page_size < 1:
        raise JobError(f"job {spec}: page_size must be a positive integer.")
    return cls
