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
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from fillgate.errors import ConfigError

DEFAULT_PROTECTED = ("live", "prod", "production")
DEFAULT_TARGET = "default"
_TARGET_KEYS = {"url", "environment", "protected"}
_TOP_KEYS = {"targets", "protected_environments", "default_target"}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Drivers fillgate uses when a URL names only the database kind.
_DRIVERS = {
    "postgres": ("postgresql+psycopg", "psycopg", "postgres"),
    "postgresql": ("postgresql+psycopg", "psycopg", "postgres"),
    "mysql": ("mysql+pymysql", "pymysql", "mysql"),
    "mariadb": ("mariadb+pymysql", "pymysql", "mysql"),
}


@dataclass(frozen=True)
class Target:
    """A named database that fillgate may touch."""

    name: str
    url: URL = field(repr=False)
    environment: str
    protected: bool = False
    protected_environments: tuple[str, ...] = DEFAULT_PROTECTED

    @property
    def safe_url(self) -> str:
        """The URL with any password masked: the only form fillgate ever prints."""
        return redact_url(self.url)

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()


@dataclass(frozen=True)
class Config:
    """Loaded configuration: the declared targets and where they came from."""

    targets: dict[str, Target]
    source: str
    default_target: str | None = None

    def target(self, name: str | None) -> Target:
        """Return the target called ``name`` (or the default one), or fail naming the choices."""
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


def redact_url(url: URL | str) -> str:
    """Render a URL with the password hidden."""
    if isinstance(url, str):
        try:
            url = make_url(url)
        except (ArgumentError, ValueError):  # ValueError: e.g. a non-numeric port
            return "<unparseable url>"
    return url.render_as_string(hide_password=True)


def interpolate(value: str, where: str, environ: dict[str, str] | None = None) -> str:
    """Replace ``${VAR}`` by the environment variable; a missing one is an error naming it."""
    env = os.environ if environ is None else environ

    def repl(match: re.Match[str]) -> str:
        var = match.group(1)
        if var not in env:
            raise ConfigError(f"{where} uses ${{{var}}}, but the environment variable {var} is not set.")
        return env[var]

    return _ENV_REF.sub(repl, value)


def parse_url(raw: str, where: str) -> URL:
    """Parse a database URL, choosing fillgate's drivers and checking they are installed."""
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):
        raise ConfigError(
            f"{where}: '{redact_url(raw)}' is not a database URL "
            "(expected e.g. postgresql://user@host/db, mysql://user@host/db or sqlite:///file.db)."
        ) from None
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql", "mysql", "mariadb") and url.drivername not in _DRIVERS:
        raise ConfigError(
            f"{where}: database kind '{url.drivername}' is not supported; "
            "fillgate supports SQLite, PostgreSQL and MySQL/MariaDB."
        )
    if url.drivername in _DRIVERS:
        drivername, module, extra = _DRIVERS[url.drivername]
        url = url.set(drivername=drivername)
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(
                f"{where} is a {backend} URL but the driver '{module}' is not installed; "
                f"install it with: pip install 'fillgate[{extra}]'"
            ) from None
    return url


def _target_from_table(name: str, table: Any, protected_envs: tuple[str, ...], source: str) -> Target:
    where = f"target '{name}' in {source}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table like [targets.{name}] with a url.")
    unknown = set(table) - _TARGET_KEYS
    if unknown:
        raise ConfigError(
            f"{where} has unknown key(s) {', '.join(sorted(unknown))}; "
            f"allowed keys are {', '.join(sorted(_TARGET_KEYS))}."
        )
    if "url" not in table or not isinstance(table["url"], str) or not table["url"].strip():
        raise ConfigError(f"{where} has no url; add url = \"postgresql://...\" (may use ${{ENV_VAR}}).")
    environment = table.get("environment", name)
    if not isinstance(environment, str) or not environment:
        raise ConfigError(f"{where}: environment must be a non-empty string.")
    protected = table.get("protected", False)
    if not isinstance(protected, bool):
        raise ConfigError(f"{where}: protected must be true or false.")
    url = parse_url(interpolate(table["url"], where), where)
    return Target(
        name=name,
        url=url,
        environment=environment,
        protected=protected or environment in protected_envs,
        protected_environments=protected_envs,
    )


def config_from_mapping(data: dict[str, Any], source: str) -> Config:
    """Build a Config from the parsed ``fillgate`` table of a TOML file."""
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(
            f"{source} has unknown key(s) {', '.join(sorted(unknown))}; "
            f"allowed are {', '.join(sorted(_TOP_KEYS))}."
        )
    envs = data.get("protected_environments", list(DEFAULT_PROTECTED))
    if not isinstance(envs, list) or not all(isinstance(e, str) for e in envs):
        raise ConfigError(f"{source}: protected_environments must be a list of strings.")
    targets_table = data.get("targets")
    if not isinstance(targets_table, dict) or not targets_table:
        raise ConfigError(f"{source} declares no targets; add a [targets.NAME] table with a url.")
    targets = {
        name: _target_from_table(name, table, tuple(envs), source)
        for name, table in targets_table.items()
    }
    default = data.get("default_target")
    if default is not None and default not in targets:
        raise ConfigError(f"{source}: default_target '{default}' is not a declared target.")
    return Config(targets=targets, source=source, default_target=default)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}.") from None


def find_config_file(start: Path | None = None) -> Path | None:
    """The nearest fillgate.toml, or pyproject.toml with [tool.fillgate], from ``start`` up."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "fillgate.toml"
        if candidate.is_file():
            return candidate
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and "fillgate" in _read_toml(pyproject).get("tool", {}):
            return pyproject
    return None


def load_config(path: str | Path | None = None) -> Config:
    """Load targets from ``path``, ``FILLGATE_CONFIG``, a file found upwards, or DATABASE_URL."""
    explicit = path or os.environ.get("FILLGATE_CONFIG")
    if explicit:
        file = Path(explicit)
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist.")
    else:
        file = find_config_file()
    if file is not None:
        data = _read_toml(file)
        if file.name == "pyproject.toml":
            data = data.get("tool", {}).get("fillgate")
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
    target = Target(
        name=DEFAULT_TARGET,
        url=parse_url(raw, where),
        environment=DEFAULT_TARGET,
        protected=False,
    )
    return Config(targets={DEFAULT_TARGET: target}, source=where, default_target=DEFAULT_TARGET)
