"""Fuzzing every parser a user feeds: the plan header, fillgate.toml, --param values and
history keys. Whatever the input, the CLI answers with a documented exit code and one
``error:``/``refused:`` line, never a traceback (``run_cli`` invokes with
``catch_exceptions=False``, so a traceback fails the test), and a refusal writes nothing."""

from __future__ import annotations

import contextlib
import json
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fillgate.config import load_config
from fillgate.errors import ConfigError

from conftest import JOBS, TestDB, run_cli

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PEOPLE = 8

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _ledger_and_table(db: TestDB) -> tuple[Any, ...]:
    return (
        db.rows("SELECT run_id, kind, status, counts FROM fillgate_runs ORDER BY run_id"),
        db.scalar("SELECT count(*) FROM fillgate_changes"),
        db.rows("SELECT id, name, email, kind FROM people ORDER BY id"),
    )


def _assert_one_error_line(result: Any, codes: tuple[int, ...]) -> None:
    assert result.exit_code in codes, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    if result.exit_code >= 2:
        assert result.stderr.startswith(("error: ", "refused: ")), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr  # one line (the terminal wraps it)


@pytest.fixture
def ready(sqlite_db: TestDB, cli: CliRunner) -> tuple[TestDB, Path]:
    """A database with people, a ledger and jobs.py (shared by a property's examples)."""
    sqlite_db.create_people(PEOPLE)
    cfg = sqlite_db.config()
    (sqlite_db.tmp_path / "jobs.py").write_text(JOBS)
    assert run_cli(cli, cfg, "init").exit_code == 0
    return sqlite_db, cfg


@pytest.fixture
def planned(ready: tuple[TestDB, Path], cli: CliRunner) -> tuple[TestDB, Path, str, str]:
    """A database with a ledger and a saved plan: (db, config, header line, body)."""
    sqlite_db, cfg = ready
    made = run_cli(cli, cfg, "plan", f"{sqlite_db.tmp_path / 'jobs.py'}:FillEmail", "-o", "p.plan")
    assert made.exit_code == 0, made.output
    header, body = (sqlite_db.tmp_path / "p.plan").read_text().split("\n", 1)
    return sqlite_db, cfg, header, body


# --- plan headers ---------------------------------------------------------------------------


@st.composite
def header_mutations(draw: st.DrawFn, header: str) -> str:
    data = json.loads(header)
    how = draw(st.sampled_from(["replace", "drop", "add", "text"]))
    if how == "replace":
        data[draw(st.sampled_from(sorted(data)))] = draw(json_values)
    elif how == "drop":
        del data[draw(st.sampled_from(sorted(data)))]
    elif how == "add":
        data[draw(st.text(min_size=1, max_size=10))] = draw(json_values)
    else:  # edit the line's text itself: insert, delete or replace a few characters
        line = header
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(line)))
            cut = draw(st.integers(0, 3))
            line = line[:at] + draw(st.text(max_size=3)) + line[at + cut:]
        return line
    return json.dumps(data)


@FUZZ
@given(data=st.data())
def test_mutated_plan_headers_are_refused(planned: tuple[TestDB, Path, str, str], cli: CliRunner,
                                          data: st.DataObject) -> None:
    db, cfg, header, body = planned
    line = data.draw(header_mutations(header))
    assume(line != header and "\n" not in line and "\r" not in line)
    with contextlib.suppress(ValueError):
        assume(json.loads(line) != json.loads(header))
    before = _ledger_and_table(db)
    path = db.tmp_path / "fuzzed.plan"
    path.write_text(line + "\n" + body, encoding="utf-8", errors="surrogatepass")
    result = run_cli(cli, cfg, "apply", str(path), "--max-changes", "100")
    _assert_one_error_line(result, (2, 3))
    assert _ledger_and_table(db) == before


@pytest.mark.parametrize("column", ["\n", "a\r\nb", "tab\there", "\x00", "\x1b[31m"])
def test_an_error_naming_a_column_with_control_characters_is_one_line(
    planned: tuple[TestDB, Path, str, str], cli: CliRunner, column: str
) -> None:
    """Found by the fuzz above (in CI): a header whose only column is named "\\n" made the
    error that lists the declared columns two lines. Control characters are shown as escapes."""
    db, cfg, header, body = planned
    data = json.loads(header)
    data["columns"] = {column: None}
    before = _ledger_and_table(db)
    path = db.tmp_path / "fuzzed.plan"
    path.write_text(json.dumps(data) + "\n" + body, encoding="utf-8")
    result = run_cli(cli, cfg, "apply", str(path), "--max-changes", "100")
    _assert_one_error_line(result, (2,))
    assert "\x1b" not in result.stderr
    assert _ledger_and_table(db) == before


@FUZZ
@given(data=st.data())
@example(data=None)  # the two cases the fuzz found (a TypeError: exit 1, "unexpected ... a bug")
def test_mutated_plan_bodies_are_refused(planned: tuple[TestDB, Path, str, str], cli: CliRunner,
                                         data: st.DataObject | None) -> None:
    """A body line whose field holds any JSON (the column a list, a key holding null) is refused
    as a damaged plan (exit 2) whatever the header says, before anything is written."""
    db, cfg, header, body = planned
    lines = body.split("\n")[:-1]
    if data is None:  # the two cases the fuzz found
        cases = [(0, "column", []), (0, "key", [None])]
    else:
        cases = [(data.draw(st.integers(0, len(lines) - 1)),
                  data.draw(st.sampled_from(["kind", "key", "column", "old", "new", "values"])),
                  data.draw(json_values))]
    for index, field, value in cases:
        record = json.loads(lines[index])
        record[field] = value
        edited = [*lines[:index], json.dumps(record), *lines[index + 1:]]
        head = json.loads(header)
        if field == "key":
            head["key"] = value if isinstance(value, list) and value else head["key"]
        before = _ledger_and_table(db)
        path = db.tmp_path / "fuzzed-body.plan"
        path.write_text(json.dumps(head) + "\n" + "\n".join(edited) + "\n")
        result = run_cli(cli, cfg, "apply", str(path), "--max-changes", "100")
        _assert_one_error_line(result, (2, 3))
        assert _ledger_and_table(db) == before


@FUZZ
@given(junk=st.binary(max_size=300))
def test_random_bytes_as_a_plan_file(planned: tuple[TestDB, Path, str, str], cli: CliRunner, junk: bytes) -> None:
    db, cfg, _, _ = planned
    before = _ledger_and_table(db)
    path = db.tmp_path / "junk.plan"
    path.write_bytes(junk)
    result = run_cli(cli, cfg, "apply", str(path), "--max-changes", "100")
    _assert_one_error_line(result, (2,))
    assert _ledger_and_table(db) == before


@pytest.mark.parametrize("field, value, message", [
    ("target", ["staging"], "target must be a string, not a list"),
    ("plan_id", 42, "plan_id must be a string, not an integer"),
    ("plan_id", "not-a-ulid", "plan_id must be a plan run id"),
    ("changes", "10", "changes must be an integer, not a string"),
    ("changes", -1, "changes must be 0 or more"),
    ("counts", {"writes": "ten"}, "counts must be a table of integers"),
    ("key", [], "key must not be empty"),
    ("dialect", "oracle", "dialect must be one of"),
    ("body_sha256", "abc", "body_sha256 must be a SHA-256"),
    ("environment", "\ud800", "not valid Unicode"),
])
def test_each_header_field_is_checked(planned: tuple[TestDB, Path, str, str], cli: CliRunner,
                                      field: str, value: Any, message: str) -> None:
    db, cfg, header, body = planned
    data = json.loads(header)
    data[field] = value
    (db.tmp_path / "bad.plan").write_text(json.dumps(data) + "\n" + body)
    before = _ledger_and_table(db)
    for as_json in ((), ("--json",)):
        result = run_cli(cli, cfg, "apply", "bad.plan", "--max-changes", "100", *as_json)
        assert result.exit_code == 2, result.output
        assert message in result.stderr and "plan header" in result.stderr, result.stderr
        if as_json:
            error = json.loads(result.stdout)["error"]
            assert (error["type"], error["exit_code"]) == ("PlanFileError", 2)
            assert message in error["message"]
    assert _ledger_and_table(db) == before


# --- fillgate.toml ----------------------------------------------------------------------------

toml_scalars = (st.text(alphabet=string.printable, max_size=20) | st.integers(-5, 10**6) | st.booleans()
                | st.floats(allow_nan=False, allow_infinity=False))
toml_values = st.recursive(toml_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(["url", "environment", "protected", "max_changes", "x"]),
                                             inner, max_size=3), max_leaves=6)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


@st.composite
def config_texts(draw: st.DrawFn, url: str) -> str:
    """A valid fillgate.toml with one thing changed: a key set to any TOML value, a key
    dropped, or a few characters of its text edited."""
    top: dict[str, Any] = {"default_target": "staging", "protected_environments": ["live"]}
    targets: dict[str, dict[str, Any]] = {"staging": {"url": url, "max_changes": 100},
                                          "live": {"url": "${FUZZ_UNSET_URL}", "protected": True}}
    how = draw(st.sampled_from(["top", "target", "drop", "text"]))
    if how == "top":
        top[draw(st.sampled_from(["default_target", "protected_environments", "targets", "other"]))] = draw(toml_values)
    elif how == "target":
        targets[draw(st.sampled_from(["staging", "live"]))][
            draw(st.sampled_from(["url", "environment", "protected", "max_changes", "protect"]))] = draw(toml_values)
    elif how == "drop":
        del targets["staging"][draw(st.sampled_from(["url", "max_changes"]))]
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    if "targets" not in top:
        for name, table in targets.items():
            lines += [f"[targets.{name}]", *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    text = "\n".join(lines) + "\n"
    if how == "text":
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(st.text(max_size=3)) + text[at + draw(st.integers(0, 3)):]
    return text


@FUZZ
@given(data=st.data())
def test_mutated_config_files(ready: tuple[TestDB, Path], cli: CliRunner, data: st.DataObject) -> None:
    sqlite_db, _ = ready
    cfg = sqlite_db.tmp_path / "fuzzed.toml"
    text = data.draw(config_texts(sqlite_db.url))
    cfg.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(cfg).target(None)
        valid = True
    except ConfigError:
        valid = False
    for command in (["runs"], ["runs", "--json"], ["history", "people", "1"]):
        result = run_cli(cli, cfg, *command)
        _assert_one_error_line(result, (0, 2, 3))
        if not valid:
            assert result.exit_code == 2, (text, result.output)
        if "--json" in command and result.exit_code:
            assert json.loads(result.stdout)["error"]["exit_code"] == result.exit_code


@FUZZ
@given(junk=st.binary(max_size=300))
def test_random_bytes_as_a_config_file(tmp_path: Path, cli: CliRunner, junk: bytes) -> None:
    cfg = tmp_path / "fillgate.toml"
    cfg.write_bytes(junk)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_cli(cli, cfg, "runs")
    _assert_one_error_line(result, (2,))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no database file conjured


@pytest.mark.parametrize("text, message", [
    ('default_target = []\n[targets.a]\nurl = "sqlite:///a.db"\n', "default_target must be a string, not a list"),
    ('[targets.a]\nurl = "sqlite:///a.db"\nmax_changes = "10"\n', "max_changes must be an integer, not a string"),
    ('[targets.a]\nurl = "sqlite:///a.db"\nmax_changes = -1\n', "max_changes must be 0 or more"),
    ('[targets.a]\nurl = "sqlite:///a.db"\nmax_changes = true\n', "max_changes must be an integer, not true or false"),
    ('[targets.a]\nurl = 5\n', "url must be a string, not an integer"),
    ('[targets.a]\nurl = "sqlite:///a.db"\nenvironment = ""\n', "environment must not be empty"),
    ('[targets.a]\nurl = "sqlite:///a.db"\nprotected = "yes"\n', "protected must be true or false"),
    ('protected_environments = ["live", 3]\n[targets.a]\nurl = "sqlite:///a.db"\n',
     "protected_environments must be a list of strings"),
    ('targets = 3\n', "targets must be a table, not an integer"),
    ('[targets]\na = 3\n', "target 'a' in"),
])
def test_each_config_field_is_checked(tmp_path: Path, cli: CliRunner, text: str, message: str) -> None:
    cfg = tmp_path / "fillgate.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert message in str(info.value)
    result = run_cli(cli, cfg, "runs")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert not (tmp_path / "a.db").exists()


@pytest.mark.parametrize("text", ["a = " + "[" * 5000 + "\n", "a = " + "9" * 5000 + "\n"])
def test_config_files_no_parser_survives(tmp_path: Path, cli: CliRunner, text: str) -> None:
    """Arrays nested too deep and integers too long to read: errors, not tracebacks."""
    cfg = tmp_path / "fillgate.toml"
    cfg.write_text(text)
    for command in (["runs"], ["lint", str(tmp_path)]):
        result = run_cli(cli, cfg, *command)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and "fillgate.toml" in result.stderr


@pytest.mark.parametrize("line", ['{"fillgate_plan": 1, "changes": ' + "9" * 5000 + "}", "[" * 100000])
def test_plan_headers_no_parser_survives(planned: tuple[TestDB, Path, str, str], cli: CliRunner, line: str) -> None:
    db, cfg, _, body = planned
    (db.tmp_path / "deep.plan").write_text(line + "\n" + body)
    result = run_cli(cli, cfg, "apply", "deep.plan", "--max-changes", "100")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and "is not a fillgate plan" in result.stderr


def test_non_utf8_config_file(tmp_path: Path, cli: CliRunner) -> None:
    cfg = tmp_path / "fillgate.toml"
    cfg.write_bytes(b'[targets.a]\nurl = "sqlite:///caf\xe9.db"\n')
    result = run_cli(cli, cfg, "runs")
    assert result.exit_code == 2, result.output
    assert "is not valid TOML" in result.stderr and "not UTF-8" in result.stderr
    # found in the working directory, too (and a pyproject.toml likewise)
    assert run_cli(cli, None, "runs").exit_code == 2
    cfg.unlink()
    (tmp_path / "pyproject.toml").write_bytes(b'[tool.fillgate]\nx = "\xff"\n')
    result = run_cli(cli, None, "runs")
    assert result.exit_code == 2 and "not UTF-8" in result.stderr


# --- --param values and history keys -----------------------------------------------------------


@FUZZ
@given(value=st.text(max_size=60), name=st.sampled_from(["domain", "domian", ""]))
def test_param_values(ready: tuple[TestDB, Path], cli: CliRunner, value: str, name: str) -> None:
    sqlite_db, cfg = ready
    result = run_cli(cli, cfg, "plan", f"{sqlite_db.tmp_path / 'jobs.py'}:OverwriteEmail", "--param", f"{name}={value}")
    _assert_one_error_line(result, (0, 1, 2))
    if "\x00" in value or any("\ud800" <= c <= "\udfff" for c in value) or name != "domain":
        assert result.exit_code == 2


@pytest.mark.parametrize("arg", ["domain=\udcff", "domain=a\ud800b", "domain=a\x00b"])
def test_undecodable_arguments(ready: tuple[TestDB, Path], cli: CliRunner, arg: str) -> None:
    sqlite_db, cfg = ready
    before = _ledger_and_table(sqlite_db)
    for command in (["plan", f"{sqlite_db.tmp_path / 'jobs.py'}:OverwriteEmail", "--param", arg],
                    ["history", "people", arg], ["history", arg, "1"], ["runs", "--target", arg]):
        result = run_cli(cli, cfg, *command)
        assert result.exit_code == 2, (command, result.output)
        assert result.stderr.startswith("error: argument ") and "not valid UTF-8 text" in result.stderr
    assert _ledger_and_table(sqlite_db) == before
    assert "byte 0xff" in run_cli(cli, cfg, "history", "people", "\udcff").stderr


@FUZZ
@given(key=st.text(max_size=40) | st.lists(json_scalars, max_size=4).map(json.dumps),
       column=st.none() | st.sampled_from(["email", "emial", "*"]), table=st.sampled_from(["people", "peple"]))
def test_history_keys(ready: tuple[TestDB, Path], cli: CliRunner, key: str, column: str | None, table: str) -> None:
    _, cfg = ready
    result = run_cli(cli, cfg, "history", table, key, *(["--column", column] if column else []))
    _assert_one_error_line(result, (0, 2))
    if table == "peple" or column == "emial":
        assert result.exit_code == 2


URL_TAILS = st.text(alphabet=string.printable + "é\x00\u2028", max_size=40)
# a server URL always points at a closed local port: no host name is looked up, nothing waits
SERVER_URLS = st.builds(lambda scheme, user, tail: f"{scheme}{user}@127.0.0.1:1/{tail}",
                        st.sampled_from(["postgresql://", "postgresql+psycopg://", "postgres://", "mysql://",
                                         "mariadb+pymysql://"]),
                        st.text(alphabet=string.ascii_letters + ":%@", max_size=8), URL_TAILS)
FILE_URLS = st.builds(lambda scheme, tail: scheme + tail,
                      st.sampled_from(["sqlite://", "sqlite:///", "sqlite:////", "sqlite+pysqlite:///", "oracle://",
                                       "", "x"]), URL_TAILS)


@FUZZ
@given(url=SERVER_URLS | FILE_URLS)
@example(url="sqlite:///new.db")
@example(url="sqlite:///sub/new.db")
@example(url="mysql://u@127.0.0.1:1/db?charset=utf8")
def test_the_early_stamp_read_takes_any_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """fillgate.stampread never raises, never creates a file, and finds no stamp where none is."""
    from fillgate import stampread

    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert stampread.stamped_environment(url) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == before
