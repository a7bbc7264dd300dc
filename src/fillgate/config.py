"""Targets: named databases, their environments and protection.

Targets come from ``fillgate.toml`` or ``[tool.fillgate]`` in ``pyproject.toml`` (searched
from the working directory upwards), or from ``--config PATH`` / ``FILLGATE_CONFIG``. With
no config file, the only target is ``default``, read from ``DATABASE_URL``. Nothing ever
falls back silently to another database.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fillgate.errors import ConfigError
from fillgate.redact import redact_url
from fillgate.validate import Field, has_surrogate, kind_of, non_empty, non_negative, validate

if TYPE_CHECKING:  # SQLAlchemy is imported when a target is resolved, not to read the config
    from sqlalchemy.engine import URL

DEFAULT_PROTECTED = ("live", "prod", "production")
DEFAULT_TARGET = "default"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# The schema of fillgate.toml: the top-level table and each [targets.NAME] table.
_TOP_SCHEMA = {
    "targets": Field(dict, rule=lambda v: None if v else "declares no target; add a [targets.NAME] table with a url"),
    "protected_environments": Field(list, required=False, items=str),
    "default_target": Field(str, required=False, rule=non_empty),
}
_TARGET_SCHEMA = {
    "url": Field(str, rule=non_empty),
    "environment": Field(str, required=False, rule=lambda v: non_empty(v) or _fits(v)),
    "protected": Field(bool, required=False),
    "max_changes": Field(int, required=False, rule=non_negative),
    "approvals": Field(int, required=False, rule=non_negative),
    "rehearse_on": Field(str, required=False, rule=non_empty),
    "rehearsal_tolerance": Field(float, required=False, rule=non_negative),
    # MariaDB/MySQL replicas whose lag --max-replication-lag watches (URLs, ${VAR} allowed)
    "replicas": Field(list, required=False, items=str),
}

NAME_LIMIT = 128  # the ledger keeps target and environment names in columns of 128 characters


def _fits(name: str) -> str | None:
    return (f"is {len(name)} characters long; fillgate's ledger keeps at most {NAME_LIMIT}"
            if len(name) > NAME_LIMIT else None)



@dataclass(frozen=True)
class Target:
    """A named database that fillgate may touch."""

    name: str
    url: URL = field(repr=False)
    environment: str
    protected: bool = False
    protected_environments: tuple[str, ...] = DEFAULT_PROTECTED
    max_changes: int | None = None  # the default --max-changes of apply and run
    approvals: int = 0  # approvals (fillgate approve) an apply needs from other operators
    rehearse_on: str | None = None  # the target where a job must have been applied first
    rehearsal_tolerance: float | None = None  # how far the plan's counts may differ from the rehearsal's
    # the rehearsal target as its own configuration declares it (resolved only when checked)
    rehearsal: TargetSpec | None = field(default=None, repr=False, compare=False)
    replicas: tuple[URL, ...] = field(default=(), repr=False)  # read by --max-replication-lag (MariaDB/MySQL)

    @classmethod
    def from_url(cls, name: str, url: str, environment: str | None = None, *, protected: bool = False,
                 max_changes: int | None = None) -> Target:
        """A target from a database URL, for code that does not read a config file (tests,
        scripts, demos): ``Target.from_url("staging", "postgresql://app@db/app")``."""
        return cls(name, parse_url(url, f"target '{name}'"), environment or name, protected=protected,
                   max_changes=max_changes)

    @property
    def safe_url(self) -> str:
        """The URL with any password masked: the only form fillgate ever prints."""
        return redact_url(self.url)

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()


@dataclass(frozen=True)
class TargetSpec:
    """A declared target as the config states it. Its url is resolved (``${VAR}``
    interpolated, parsed, driver checked) only by :meth:`resolve`, when the target is used:
    an unset variable or a missing driver of one target never blocks another."""

    name: str
    raw_url: str = field(repr=False)
    environment: str
    protected: bool = False
    protected_environments: tuple[str, ...] = DEFAULT_PROTECTED
    max_changes: int | None = None
    where: str = ""
    interpolate: bool = True
    approvals: int = 0
    rehearse_on: str | None = None
    rehearsal_tolerance: float | None = None
    raw_replicas: tuple[str, ...] = field(default=(), repr=False)

    def url_text(self) -> str:
        """The url as written, with its ``${VAR}`` references replaced (not parsed)."""
        return self._interpolated(self.raw_url)

    def _interpolated(self, raw: str) -> str:
        return interpolate(raw, self.where) if self.interpolate else raw

    def resolve(self, rehearsal: TargetSpec | None = None) -> Target:
        return Target(
            name=self.name,
            url=parse_url(self.url_text(), self.where),
            environment=self.environment,
            protected=self.protected,
            protected_environments=self.protected_environments,
            max_changes=self.max_changes,
            approvals=self.approvals,
            rehearse_on=self.rehearse_on,
            rehearsal_tolerance=self.rehearsal_tolerance,
            rehearsal=rehearsal,
            replicas=tuple(
                parse_url(self._interpolated(raw), f"a replica of {self.where}")
                for raw in self.raw_replicas
            ),
        )


@dataclass(frozen=True)
class Config:
    """Loaded configuration: the declared targets and where they came from."""

    targets: dict[str, TargetSpec]
    source: str
    default_target: str | None = None

    def target(self, name: str | None) -> Target:
        """The target called ``name`` (or the default one), resolved; or fail naming the choices."""
        spec = self.spec(name)
        return spec.resolve(self.targets.get(spec.rehearse_on) if spec.rehearse_on else None)

    def spec(self, name: str | None) -> TargetSpec:
        """The target called ``name`` (or the default one) as declared, not resolved; or fail
        naming the choices."""
        if name is None:
            name = self.default_target
            if name is None:
                if len(self.targets) == 1:
                    name = next(iter(self.targets))
                else:
                    raise ConfigError(
                        f"{self.source} declares several targets "
                        f"({', '.join(sorted(self.targets))}); choose one with --target NAME."
                    )
        try:
            return self.targets[name]
        except KeyError:
            known = ", ".join(sorted(self.targets)) or "none"
            raise ConfigError(
                f"unknown target '{name}' (declared in {self.source}: {known}); "
                "add [targets." + name + "] to fillgate.toml or pick a declared one."
            ) from None


def interpolate(value: str, where: str, environ: dict[str, str] | None = None) -> str:
    """Replace ``${VAR}`` by the environment variable; a missing one is an error naming it."""
    env = os.environ if environ is None else environ

    def repl(match: re.Match[str]) -> str:
        var = match.group(1)
        if var not in env:
            raise ConfigError(f"{where} uses ${{{var}}}, but the environment variable {var} is not set.")
        if has_surrogate(env[var]):
            raise ConfigError(f"{where} uses ${{{var}}}, but the environment variable {var} is not UTF-8 text.")
        return env[var]

    return _ENV_REF.sub(repl, value)


def parse_url(raw: str, where: str) -> URL:
    """Parse a database URL, choosing fillgate's drivers and checking they are installed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from fillgate.backends import supported_dialects, url_drivers

    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):
        raise ConfigError(
            f"{where}: '{redact_url(raw)}' is not a database URL "
            "(expected e.g. postgresql://user@host/db, mysql://user@host/db or sqlite:///file.db)."
        ) from None
    backend = url.get_backend_name()
    drivers = url_drivers()
    if backend not in supported_dialects() and url.drivername not in drivers:
        raise ConfigError(
            f"{where}: database kind '{url.drivername}' is not supported; "
            "fillgate supports SQLite, PostgreSQL and MySQL/MariaDB."
        )
    if url.drivername in drivers:
        drivername, module, extra = drivers[url.drivername]
        url = url.set(drivername=drivername)
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(
                f"{where} is a {backend} URL but the driver '{module}' is not installed; "
                f"install it with: pip install 'fillgate[{extra}]'"
            ) from None
    return url


def _unknown_keys(table: dict[str, Any], schema: dict[str, Field], where: str) -> None:
    unknown = set(table) - set(schema)
    if unknown:
        raise ConfigError(
            f"{where} has unknown key(s) {', '.join(sorted(unknown))}; "
            f"allowed keys are {', '.join(sorted(schema))}."
        )


def _target_spec(name: str, table: Any, protected_envs: tuple[str, ...], source: str) -> TargetSpec:
    where = f"target '{name}' in {source}"
    if not name.strip():
        raise ConfigError(f"{source} declares a target with an empty name; name it [targets.NAME].")
    if _fits(name):
        raise ConfigError(f"{source} declares a target whose name {_fits(name)}; give it a shorter name.")
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table like [targets.{name}] with a url, not {kind_of(table)}.")
    _unknown_keys(table, _TARGET_SCHEMA, where)
    if "url" not in table:
        raise ConfigError(f"{where} has no url; add url = \"postgresql://...\" (may use ${{ENV_VAR}}).")
    validate(table, _TARGET_SCHEMA, where, ConfigError, ".")
    environment = table.get("environment", name)
    return TargetSpec(
        name=name,
        raw_url=table["url"],
        environment=environment,
        protected=table.get("protected", False) or environment in protected_envs,
        protected_environments=protected_envs,
        max_changes=table.get("max_changes"),
        where=where,
        approvals=table.get("approvals", 0),
        rehearse_on=table.get("rehearse_on"),
        rehearsal_tolerance=None if table.get("rehearsal_tolerance") is None else float(table["rehearsal_tolerance"]),
        raw_replicas=tuple(table.get("replicas", ())),
    )


def config_from_mapping(data: Any, source: str) -> Config:
    """Build a Config from the parsed ``fillgate`` table of a TOML file. Every field is
    checked; urls are resolved later, by :meth:`Config.target`, for the target used."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the fillgate configuration must be a table, not {kind_of(data)}.")
    _unknown_keys(data, _TOP_SCHEMA, source)
    if "targets" not in data:
        raise ConfigError(f"{source} declares no targets; add a [targets.NAME] table with a url.")
    validate(data, _TOP_SCHEMA, source, ConfigError, ".")
    envs = tuple(data.get("protected_environments", DEFAULT_PROTECTED))
    targets = {name: _target_spec(name, table, envs, source) for name, table in data["targets"].items()}
    _check_rehearsals(targets, source)
    default = data.get("default_target")
    if default is not None and default not in targets:
        raise ConfigError(f"{source}: default_target '{default}' is not a declared target.")
    return Config(targets=targets, source=source, default_target=default)


def _check_rehearsals(targets: dict[str, TargetSpec], source: str) -> None:
    """``rehearse_on`` names another declared target; a tolerance needs a rehearsal."""
    for name, spec in targets.items():
        if spec.rehearsal_tolerance is not None and spec.rehearse_on is None:
            raise ConfigError(f"{spec.where} sets rehearsal_tolerance without rehearse_on; add rehearse_on = "
                              "\"TARGET\" (the target where its jobs are applied first).")
        if spec.rehearse_on is None:
            continue
        if spec.rehearse_on == name:
            raise ConfigError(f"{spec.where}: rehearse_on names the target itself; name another target.")
        if spec.rehearse_on not in targets:
            raise ConfigError(f"{spec.where}: rehearse_on = \"{spec.rehearse_on}\" is not a declared target "
                              f"(declared in {source}: {', '.join(sorted(targets))}).")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}.") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid TOML: byte {exc.start} is not UTF-8 (TOML files are UTF-8 text)."
        ) from None
    except (ValueError, RecursionError) as exc:  # an integer too long to read, arrays nested too deep
        raise ConfigError(f"{path} is not valid TOML: {exc}.") from None


def _tool_fillgate(pyproject: dict[str, Any]) -> Any:
    """The [tool.fillgate] table of a parsed pyproject.toml, or None."""
    tool = pyproject.get("tool")
    return tool.get("fillgate") if isinstance(tool, dict) else None


def find_config_file(start: Path | None = None) -> Path | None:
    """The nearest fillgate.toml, or pyproject.toml with [tool.fillgate], from ``start`` up."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "fillgate.toml"
        if candidate.is_file():
            return candidate
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and _tool_fillgate(_read_toml(pyproject)) is not None:
            return pyproject
    return None


def load_config(path: str | Path | None = None) -> Config:
    """Load targets from ``path``, ``FILLGATE_CONFIG``, a file found upwards, or DATABASE_URL."""
    explicit = path or os.environ.get("FILLGATE_CONFIG")
    if explicit:
        given = Path(explicit)
        if not given.is_file():
            raise ConfigError(f"config file {given} does not exist.")
        file: Path | None = given
    else:
        file = find_config_file()
    if file is not None:
        data = _read_toml(file)
        if file.name == "pyproject.toml":
            data = _tool_fillgate(data)
            if data is None:
                raise ConfigError(f"{file} has no [tool.fillgate] table.")
        return config_from_mapping(data, str(file))
    raw = os.environ.get("DATABASE_URL")
    if not raw:
        raise ConfigError(
            "no fillgate.toml found and DATABASE_URL is not set: fillgate does not know which "
            "database to use. Create fillgate.toml with a [targets.NAME] table, or set DATABASE_URL."
        )
    where = "DATABASE_URL"
    target = TargetSpec(name=DEFAULT_TARGET, raw_url=raw, environment=DEFAULT_TARGET, where=where, interpolate=False)
    return Config(targets={DEFAULT_TARGET: target}, source=where, default_target=DEFAULT_TARGET)
