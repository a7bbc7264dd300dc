"""``fillgate lint``: find hard-coded targets and database URLs in job modules.

A job reaches its database only through the ``ctx`` it is handed (docs/design.md, "Run
context"). The first incident was a nested call whose target was hard-coded to ``live``; the
third, a hidden ``sqlite3.connect()`` that bypassed ``DATABASE_URL``. fillgate refuses both
at run time; this module finds them before anything runs, by reading the source with
:mod:`ast` (nothing is imported or executed).

Rules (each finding has one code):

``FG001``  a string literal that is a database URL (``postgresql://``, ``postgres://``,
           ``mysql://``, ``mariadb://``, ``sqlite:///``, each optionally ``+driver``).
``FG002``  ``open_target("...")`` / ``ctx.open_target("...")`` with a literal target name.
``FG003``  a literal target name given to fillgate's config API:
           ``load_config(...).target("live")``, ``Target("live", ...)``.
``FG004``  a literal ``target=`` / ``target_name=`` / ``environment=`` / ``env=`` keyword, or
           a header-style dict entry or assignment (``{"X-Target": "live"}``,
           ``headers["X-Environment"] = "prod"``), whose value is a protected environment
           (default: live, prod, production) or a configured target name.
``FG005``  a connection that bypasses the run's target: ``create_engine(...)``,
           ``sqlite3.connect(...)``, ``psycopg.connect(...)``, ``pymysql.connect(...)`` and
           their kin.
``FG006``  ``DATABASE_URL`` (or ``*_DATABASE_URL``) read from the environment in job code.

A ``# fillgate: allow`` comment on the finding's line suppresses it (``# fillgate:
allow[FG005]`` suppresses only the codes listed). Found URLs are shown with any password
masked. Docstrings are not checked.
"""

from __future__ import annotations

import ast
import io
import os
import re
import tokenize
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fillgate.config import DEFAULT_PROTECTED, find_config_file
from fillgate.errors import UsageError
from fillgate.redact import mask_secrets

RULES: dict[str, str] = {
    "FG000": "cannot parse this file, so it cannot be checked",
    "FG001": "hard-coded database URL",
    "FG002": "hard-coded target name passed to open_target()",
    "FG003": "hard-coded target name passed to fillgate's config API",
    "FG004": "hard-coded target/environment name",
    "FG005": "database connection that bypasses the run's target",
    "FG006": "DATABASE_URL read from the environment in job code",
}

_URL = re.compile(
    r"(?<![\w+./-])(?:(?:postgres(?:ql)?|mysql|mariadb)(?:\+\w+)?://|sqlite(?:\+\w+)?:///)[^\s'\"<>]+",
    re.IGNORECASE,
)
_ALLOW = re.compile(r"#\s*fillgate:\s*allow\b(?:\[([A-Za-z0-9_,\s]+)\])?", re.IGNORECASE)
_ENV_VAR = re.compile(r"^(?:\w+_)?DATABASE_URL$")

# Fully qualified callables that open a database connection of their own.
_CONNECTORS = {
    "sqlalchemy.create_engine",
    "sqlalchemy.engine.create_engine",
    "sqlalchemy.engine_from_config",
    "sqlalchemy.engine.engine_from_config",
    "sqlalchemy.ext.asyncio.create_async_engine",
    "sqlite3.connect",
    "sqlite3.dbapi2.connect",
    "psycopg.connect",
    "psycopg.Connection.connect",
    "psycopg.AsyncConnection.connect",
    "psycopg2.connect",
    "pymysql.connect",
    "pymysql.Connect",
    "pymysql.connections.Connection",
    "MySQLdb.connect",
    "mysql.connector.connect",
    "mariadb.connect",
    "asyncpg.connect",
    "asyncpg.create_pool",
    "aiosqlite.connect",
    "aiomysql.connect",
}
# Names that open a connection even when their import cannot be resolved (star imports).
_CONNECTOR_NAMES = {"create_engine", "create_async_engine", "engine_from_config"}
_FILLGATE_TARGET = {"fillgate.Target", "fillgate.config.Target"}
_FILLGATE_LOAD_CONFIG = {"fillgate.load_config", "fillgate.config.load_config"}
_TARGET_KEYWORDS = {"target", "target_name", "environment", "env"}
_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages", ".venv", "venv", ".tox", ".nox", ".git"}


@dataclass(frozen=True, order=True)
class Finding:
    """One hard-coded target or database URL. ``line`` and ``col`` are 1-based."""

    file: str
    line: int
    col: int
    code: str
    message: str
    found: str

    def format(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.code} {self.message} (found: {self.found})"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def mask_url(text: str) -> str:
    """``postgresql://app:secret@db/app`` -> ``postgresql://app:***@db/app`` (and every
    other password form fillgate masks: see :func:`fillgate.redact.mask_secrets`)."""
    return mask_secrets(text)


def python_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files to lint: files as given, folders searched recursively for ``*.py``.

    A path that does not exist is a :class:`~fillgate.errors.UsageError` (exit 2).
    """
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(
                sorted(
                    p for p in path.rglob("*.py")
                    if p.is_file() and not any(
                        part in _SKIP_DIRS or (part.startswith(".") and part not in (".", ".."))
                        for part in p.relative_to(path).parts[:-1]
                    )
                )
            )
        elif path.is_file():
            out.append(path)
        else:
            raise UsageError(f"path {raw} does not exist; give job modules (files) or folders to lint.")
    seen: set[Path] = set()
    unique = []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def lint_paths(
    paths: Iterable[str | Path],
    target_names: Iterable[str] = (),
    protected_environments: Iterable[str] = DEFAULT_PROTECTED,
) -> list[Finding]:
    """Lint every Python file under ``paths``; findings sorted by file, line and column.

    ``target_names`` (e.g. the targets declared in fillgate.toml) and
    ``protected_environments`` are the names rule FG004 treats as hard-coded targets.
    """
    names = {n.lower() for n in (*protected_environments, *target_names) if n}
    findings: list[Finding] = []
    for path in python_files(paths):
        findings.extend(lint_source(path.read_bytes(), str(path), names))
    return sorted(findings)


def lint_source(source: str | bytes, filename: str = "<string>", names: Iterable[str] | None = None) -> list[Finding]:
    """Lint one module's source text."""
    names = {n.lower() for n in (DEFAULT_PROTECTED if names is None else names)}
    try:
        tree = ast.parse(source, filename=filename)
    except (SyntaxError, ValueError) as exc:
        line = getattr(exc, "lineno", None) or 1
        col = getattr(exc, "offset", None) or 1
        return [Finding(filename, line, col, "FG000", RULES["FG000"], str(getattr(exc, "msg", exc)))]
    visitor = _Visitor(filename, names)
    visitor.visit(tree)
    allowed = _allow_comments(source)
    return [f for f in visitor.findings if not _suppressed(f, allowed)]


def _allow_comments(source: str | bytes) -> dict[int, set[str] | None]:
    """Line -> codes allowed there (None: every code)."""
    text = source.decode("utf-8", "replace") if isinstance(source, bytes) else source
    out: dict[int, set[str] | None] = {}
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return out
    for tok in tokens:
        if tok.type != tokenize.COMMENT:
            continue
        match = _ALLOW.search(tok.string)
        if not match:
            continue
        line = tok.start[0]
        codes = {c.strip().upper() for c in match.group(1).split(",") if c.strip()} if match.group(1) else None
        if codes is None or out.get(line, set()) is None:
            out[line] = None
        else:
            out.setdefault(line, set()).update(codes)  # type: ignore[union-attr]
    return out


def _suppressed(finding: Finding, allowed: dict[int, set[str] | None]) -> bool:
    if finding.line not in allowed:
        return False
    codes = allowed[finding.line]
    return codes is None or finding.code in codes


def _literal(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _dotted(node: ast.AST) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _header_key(key: str) -> bool:
    low = key.lower().replace("_", "-")
    low = low.removeprefix("x-")
    return "target" in low or low in ("env", "environment") or low.endswith(("-env", "-environment"))


class _Visitor(ast.NodeVisitor):
    def __init__(self, filename: str, names: set[str]) -> None:
        self.filename = filename
        self.names = names
        self.findings: list[Finding] = []
        self.aliases: dict[str, str] = {}  # local name -> fully qualified name
        self.config_vars: set[str] = set()  # names bound to load_config(...)
        self.docstrings: set[int] = set()

    # --- helpers -----------------------------------------------------------------------

    def add(self, node: ast.AST, code: str, message: str, found: str) -> None:
        self.findings.append(Finding(self.filename, getattr(node, "lineno", 1),
                                     getattr(node, "col_offset", 0) + 1, code, message, found))

    def qualified(self, node: ast.AST) -> str | None:
        """The fully qualified name a call's function refers to, following imports."""
        dotted = _dotted(node)
        if dotted is None:
            return None
        head, _, rest = dotted.partition(".")
        if head in self.aliases:
            return self.aliases[head] + ("." + rest if rest else "")
        return dotted

    def is_protected(self, value: str) -> bool:
        return value.strip().lower() in self.names

    # --- imports and docstrings --------------------------------------------------------

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                head = alias.name.split(".")[0]
                self.aliases.setdefault(head, head)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and not node.level:
            for alias in node.names:
                if alias.name != "*":
                    self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def _mark_docstring(self, body: Sequence[ast.stmt]) -> None:
        if body and isinstance(body[0], ast.Expr) and _literal(body[0].value) is not None:
            self.docstrings.add(id(body[0].value))

    def visit_Module(self, node: ast.Module) -> None:
        self._mark_docstring(node.body)
        self.generic_visit(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._mark_docstring(node.body)
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._mark_docstring(node.body)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    # --- FG001: URL literals -----------------------------------------------------------

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and id(node) not in self.docstrings:
            self._check_url(node, node.value)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        # An f-string: check the text with each placeholder shown as {...}.
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                parts.append(value.value)
            elif isinstance(value, ast.FormattedValue):
                simple = _dotted(value.value)
                parts.append("{" + (simple or "...") + "}")
        self._check_url(node, "".join(parts))
        for value in node.values:
            if isinstance(value, ast.FormattedValue):
                self.visit(value.value)

    def _check_url(self, node: ast.AST, text: str) -> None:
        for match in _URL.finditer(text):
            found = _trim(match.group(0))
            self.add(node, "FG001", "hard-coded database URL; declare it as a target and use ctx", mask_url(found))

    # --- assignments: config variables, header assignments -----------------------------

    def visit_Assign(self, node: ast.Assign) -> None:
        if isinstance(node.value, ast.Call) and self.qualified(node.value.func) in (
            *_FILLGATE_LOAD_CONFIG, "load_config"
        ):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    self.config_vars.add(target.id)
        value = _literal(node.value)
        if value is not None and self.is_protected(value):
            for target in node.targets:
                key = _literal(target.slice) if isinstance(target, ast.Subscript) else None
                if key is not None and _header_key(key):
                    self.add(node.value, "FG004", f"header {key!r} names target '{value}'; "
                             "a run reaches only its own target (use ctx)", f"{key}: {value}")
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for key_node, value_node in zip(node.keys, node.values, strict=True):
            key, value = _literal(key_node), _literal(value_node)
            if key is not None and value is not None and _header_key(key) and self.is_protected(value):
                self.add(value_node, "FG004", f"header {key!r} names target '{value}'; "
                         "a run reaches only its own target (use ctx)", f"{key}: {value}")
        self.generic_visit(node)

    # --- calls -------------------------------------------------------------------------

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = self.qualified(func)
        first = node.args[0] if node.args else None

        # FG002: open_target("live")
        last = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if last == "open_target":
            literal = _literal(first) or _literal(_keyword(node, "name"))
            if literal is not None:
                self.add(node, "FG002", "open_target() with a hard-coded target name; "
                         "a run reaches only its own target (use ctx)", f"open_target({literal!r})")

        # FG003: load_config(...).target("live"), config.target("live"), Target("live", ...)
        if isinstance(func, ast.Attribute) and func.attr == "target":
            receiver = func.value
            from_config = (
                isinstance(receiver, ast.Call)
                and self.qualified(receiver.func) in (*_FILLGATE_LOAD_CONFIG, "load_config")
            ) or (isinstance(receiver, ast.Name) and receiver.id in self.config_vars)
            literal = _literal(first) or _literal(_keyword(node, "name"))
            if from_config and literal is not None:
                self.add(node, "FG003", "hard-coded target name in fillgate's config API; "
                         "job code uses the run's ctx", f".target({literal!r})")
        if name in (*_FILLGATE_TARGET, "Target"):
            literal = _literal(first) or _literal(_keyword(node, "name"))
            if literal is not None:
                self.add(node, "FG003", "hard-coded target name in fillgate's config API; "
                         "job code uses the run's ctx", f"Target({literal!r}, ...)")

        # FG004: target="live", environment="prod"
        for kw in node.keywords:
            value = _literal(kw.value)
            if kw.arg in _TARGET_KEYWORDS and value is not None and self.is_protected(value):
                self.add(kw.value, "FG004", f"{kw.arg}= names target '{value}'; "
                         "a run reaches only its own target (use ctx)", f"{kw.arg}={value!r}")

        # FG005: create_engine(...), sqlite3.connect(...)
        if name is not None and (name in _CONNECTORS or name.split(".")[-1] in _CONNECTOR_NAMES):
            self.add(node, "FG005", f"{name}() opens a connection that bypasses the run's target; "
                     "use ctx.execute / ctx.connection", _call_text(node))

        # FG006: os.getenv("DATABASE_URL"), os.environ.get("DATABASE_URL")
        if name in ("os.getenv", "os.environ.get", "os.environ.setdefault", "os.environ.pop"):
            var = _literal(first) or _literal(_keyword(node, "key"))
            if var is not None and _ENV_VAR.match(var):
                self.add(node, "FG006", f"job code reads {var}, choosing its own database; use ctx",
                         f"{name}({var!r})")
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        # FG006: os.environ["DATABASE_URL"]
        var = _literal(node.slice)
        if var is not None and _ENV_VAR.match(var) and self.qualified(node.value) == "os.environ":
            self.add(node, "FG006", f"job code reads {var}, choosing its own database; use ctx",
                     f"os.environ[{var!r}]")
        self.generic_visit(node)


def _trim(found: str) -> str:
    """Drop punctuation that ends the sentence around a URL, not the URL itself."""
    pairs = {")": "(", "]": "[", "}": "{"}
    while found:
        last = found[-1]
        if last in ".,;:!?" or (last in pairs and found.count(pairs[last]) < found.count(last)):
            found = found[:-1]
        else:
            break
    return found


def _keyword(node: ast.Call, name: str) -> ast.AST | None:
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _call_text(node: ast.Call, width: int = 80) -> str:
    text = mask_url(ast.unparse(node))
    return text if len(text) <= width else text[: width - 3] + "..."


def configured_names(config: str | Path | None = None) -> tuple[list[str], list[str]]:
    """Target names and protected environments from fillgate's config, without resolving
    URLs (``${VAR}`` need not be set to lint). ``([], defaults)`` when there is no config."""
    explicit = config or os.environ.get("FILLGATE_CONFIG")
    file = Path(explicit) if explicit else find_config_file()
    if explicit and not (file and file.is_file()):
        raise UsageError(f"config file {explicit} does not exist.")
    if file is None:
        return [], list(DEFAULT_PROTECTED)
    try:
        data = tomllib.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad TOML or UTF-8, too long an integer
        raise UsageError(f"cannot read config file {file}: {exc}") from None
    if file.name == "pyproject.toml":
        data = data.get("tool", {}).get("fillgate", {})
    targets = data.get("targets") or {}
    protected = data.get("protected_environments", list(DEFAULT_PROTECTED))
    names = [str(n) for n in targets] if isinstance(targets, dict) else []
    for table in targets.values() if isinstance(targets, dict) else ():
        if isinstance(table, dict) and isinstance(table.get("environment"), str):
            names.append(table["environment"])
    return names, [str(p) for p in protected] if isinstance(protected, list) else list(DEFAULT_PROTECTED)


def iter_lines(findings: Iterable[Finding]) -> Iterator[str]:
    for finding in findings:
        yield finding.format()
