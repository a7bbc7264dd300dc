"""Generate the command output shown in the documentation, from real runs.

Every block of the docs that shows a command and its output is a file of ``docs/_snippets/``,
included in the page with pymdownx.snippets (``--8<-- "name.txt"``), and the README's blocks are
copies of them between ``<!-- snippet: name -->`` markers. This script makes them: it runs the
documented commands (the ``fillgate`` command of this Python's environment) on databases it
creates, in work folders under ``--work`` (default ``/tmp/fillgate-docs``), and writes what
they printed. ``tests/test_docs.py`` runs it again and compares, ignoring only what differs
from run to run (see :func:`normalise`).

    .venv/bin/python docs/gen/snippets.py            # regenerate docs/_snippets and README.md
    .venv/bin/python docs/gen/snippets.py --only tour

Deterministic apart from ids, times and temporary paths: fixed seeds, FILLGATE_OPERATOR=ana@ops,
COLUMNS=100, TZ=UTC. Needs ``jq`` and ``sqlite3`` on PATH (the docs show them).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
CODE = DOCS / "code"
OUT = DOCS / "_snippets"
README = REPO / "README.md"
WORK = Path("/tmp/fillgate-docs")
OPERATOR = "ana@ops"
ULID = r"[0-9A-HJKMNP-TV-Z]{26}"

# --------------------------------------------------------------------------------------------
# running commands


@dataclass
class Out:
    command: str
    output: str
    rc: int

    def transcript(self, *, exit_code: bool = False, keep: Callable[[list[str]], list[str]] | None = None) -> str:
        lines = self.output.rstrip("\n").split("\n") if self.output.strip() else []
        if keep is not None:
            lines = keep(lines)
        text = "\n".join([f"$ {self.command}", *lines])
        if exit_code:
            text += f"\n$ echo $?\n{self.rc}"
        return text


class Shell:
    """Runs commands with bash in one folder, stdout and stderr merged as a terminal shows them."""

    def __init__(self, cwd: Path, **env: str) -> None:
        self.cwd = cwd
        bindir = str(Path(sys.executable).parent)
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("FILLGATE_", "PYTEST_")) and k not in ("DATABASE_URL", "COLUMNS", "LINES")}
        self.env = {**base, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "COLUMNS": "100",
                    "FILLGATE_OPERATOR": OPERATOR, "TZ": "UTC", "NO_COLOR": "1", "PYTHONHASHSEED": "0", **env}

    def run(self, command: str, *, expect: int | None = 0, **env: str) -> Out:
        done = subprocess.run(["bash", "-c", command], cwd=self.cwd, env={**self.env, **env}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
        out = Out(command, done.stdout, done.returncode)
        if expect is not None and done.returncode != expect:
            raise SystemExit(f"`{command}` in {self.cwd} exited {done.returncode}, expected {expect}:\n{done.stdout}")
        return out


def first_ulid(text: str, after: str = "") -> str:
    match = re.search(re.escape(after) + r".*?(" + ULID + ")", text, re.S)
    if not match:
        raise SystemExit(f"no run id after {after!r} in:\n{text}")
    return match.group(1)


def head(n: int) -> Callable[[list[str]], list[str]]:
    return lambda lines: lines if len(lines) <= n else [*lines[:n], "…"]


def fresh(work: Path, name: str, code: str | None = None) -> Path:
    folder = work / name
    if folder.exists():
        shutil.rmtree(folder)
    if code:
        shutil.copytree(CODE / code, folder, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        folder.mkdir(parents=True)
    return folder


def join(*parts: str) -> str:
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# sessions: each returns {snippet file name: text}


def tour(work: Path) -> dict[str, str]:
    """The demo, then the commands it suggests, from the folder it leaves."""
    folder = fresh(work, "tour")
    sh = Shell(folder)
    s: dict[str, str] = {}
    demo = sh.run("fillgate demo --path shop/demo.db")
    s["tour-demo.txt"] = demo.transcript()
    apply_run = first_ulid(demo.output, "Apply run ")
    revert_run = first_ulid(demo.output, "Revert run ")
    shop = Shell(folder / "shop")
    s["tour-config.txt"] = shop.run("cat fillgate.toml").transcript()
    s["tour-runs.txt"] = shop.run("fillgate runs -n 3").transcript()
    s["tour-show.txt"] = shop.run(f"fillgate show {apply_run}").transcript()
    s["tour-stamp-refused.txt"] = shop.run(
        "fillgate plan fillgate.demo:FillCustomerEmail --target live", expect=3).transcript(exit_code=True)
    s["tour-json-error.txt"] = shop.run(
        "fillgate plan fillgate.demo:FillCustomerEmail --target live --json", expect=3).transcript()
    plan = shop.run("fillgate plan fillgate.demo:FillCustomerEmail -o again.plan --sample 3", expect=1)
    s["tour-plan.txt"] = plan.transcript(exit_code=True)
    s["tour-plan-lines.txt"] = shop.run(
        "grep -m1 '\"kind\":\"change\"' again.plan; grep -m1 '\"kind\":\"preserved\"' again.plan; "
        "grep -m1 '\"kind\":\"error\"' again.plan").transcript()
    s["tour-gate.txt"] = shop.run("fillgate apply again.plan --max-changes 25", expect=3).transcript(exit_code=True)
    applied = shop.run("fillgate apply again.plan --max-changes 2423")
    s["tour-apply.txt"] = applied.transcript()
    again_run = first_ulid(applied.output, "Apply run ")
    s["tour-apply-twice.txt"] = shop.run("fillgate apply again.plan --max-changes 2423", expect=3).transcript(
        exit_code=True)
    s["tour-history.txt"] = shop.run("fillgate history customers 5").transcript()
    s["tour-history-error.txt"] = shop.run("fillgate history customers 5,1", expect=2).transcript(exit_code=True)
    # a conflict: someone edits a row after the apply; the revert leaves it alone
    shop.run("sqlite3 demo.db \"UPDATE customers SET email = 'ken@sparck.example' WHERE id = 5\"")
    s["tour-revert-dry-run.txt"] = shop.run(f"fillgate revert {again_run} --dry-run").transcript(
        keep=head(40))
    s["tour-revert.txt"] = join(
        "$ sqlite3 demo.db \"UPDATE customers SET email = 'ken@sparck.example' WHERE id = 5\"",
        shop.run(f"fillgate revert {again_run}", expect=1).transcript(exit_code=True),
    )
    s["tour-revert-again.txt"] = shop.run(f"fillgate revert {again_run}", expect=3).transcript(exit_code=True)
    s["tour-verify.txt"] = shop.run("fillgate verify").transcript(exit_code=True)
    s["tour-audit-rows.txt"] = shop.run(
        "sqlite3 -header demo.db \"SELECT id, run_id, table_name, row_key, column_name, op, old_value, new_value, "
        f"source, seq FROM fillgate_changes WHERE run_id = '{again_run}' ORDER BY id LIMIT 3\"").transcript()
    # tampering: the owner of the file drops a trigger and deletes a run's packed audit batch
    tamper = ("sqlite3 demo.db \"DROP TRIGGER fillgate_audit_batches_no_delete; "
              f"DELETE FROM fillgate_audit_batches WHERE run_id = '{revert_run}'\"")
    shop.run(tamper)
    s["tour-tamper.txt"] = join(
        f"$ {tamper}",
        shop.run("fillgate verify", expect=4).transcript(exit_code=True),
    )
    s["tour-unknown-run.txt"] = shop.run("fillgate show 01M8000000000000000000000A", expect=2).transcript(
        exit_code=True)
    return s


def people(work: Path) -> dict[str, str]:
    """Write and test a job: the FillEmail job on a small people table."""
    folder = fresh(work, "people", "people")
    sh = Shell(folder)
    s: dict[str, str] = {}
    sh.run("python seed.py people.db")
    s["people-init.txt"] = sh.run("fillgate init --target staging").transcript()
    s["people-init-again.txt"] = sh.run("fillgate init --target staging").transcript()
    s["people-plan.txt"] = sh.run("fillgate plan jobs.py:FillEmail --target staging -o fill-email.plan").transcript()
    s["people-plan-file.txt"] = sh.run("head -3 fill-email.plan").transcript()
    s["people-param-error.txt"] = sh.run(
        "fillgate plan jobs.py:FillEmail --param since=yesterday --param domian=corp.example", expect=2
    ).transcript(exit_code=True)
    s["people-live-unset.txt"] = sh.run("fillgate plan jobs.py:FillEmail --target live", expect=2).transcript(
        exit_code=True)
    s["people-gate.txt"] = sh.run("fillgate apply fill-email.plan --max-changes 25", expect=3).transcript(
        exit_code=True)
    s["people-apply.txt"] = sh.run("fillgate apply fill-email.plan --max-changes 239").transcript()
    s["people-plan-again.txt"] = sh.run("fillgate plan jobs.py:FillEmail --sample 0").transcript()
    s["people-run.txt"] = sh.run(
        "fillgate run jobs.py:FillEmail --param since=2018-01-01 --param domain=corp.example --max-changes 100"
    ).transcript()
    s["people-pytest.txt"] = sh.run("pytest -q -p no:cacheprovider test_jobs.py").transcript()
    narrow = Shell(folder, COLUMNS="80")
    narrow.run("fillgate run visits.py:StampVisits")
    s["people-history-vertical.txt"] = join(
        narrow.run("fillgate history visits 1,2024-01-01").transcript(),
        narrow.run("fillgate history visits 1", expect=2).transcript(),
    )
    return s


def production(work: Path) -> dict[str, str]:
    """Running on production: the registry runbook (examples/stale_classifications) from staging to live."""
    folder = fresh(work, "production", "production")
    for name in ("jobs.py", "stale_agents.py"):
        shutil.copy(REPO / "examples" / "stale_classifications" / name, folder / name)
    sh = Shell(folder)
    ben = {"FILLGATE_OPERATOR": "ben@ops"}
    s: dict[str, str] = {}
    sh.run("python seed.py staging.db live.db")
    s["production-init.txt"] = join(sh.run("fillgate init --target staging").transcript(),
                                    sh.run("fillgate init --target live --confirm live").transcript())
    job = "jobs.py:ReconcileAgentTypes"
    s["production-plan-live.txt"] = sh.run(f"fillgate plan {job} --target live -o reconcile-live.plan --sample 3"
                                           ).transcript()
    s["production-approval-refused.txt"] = sh.run(
        "fillgate apply reconcile-live.plan --confirm live", expect=3).transcript(exit_code=True)
    approve = "fillgate approve reconcile-live.plan --comment '24 flips; 22 on staging, sample checked'"
    s["production-approve.txt"] = sh.run(f"FILLGATE_OPERATOR=ben@ops {approve}", **ben).transcript()
    s["production-rehearsal-refused.txt"] = sh.run(
        "fillgate apply reconcile-live.plan --confirm live", expect=3).transcript(exit_code=True)
    s["production-rehearse.txt"] = join(
        sh.run(f"fillgate plan {job} --target staging -o reconcile-staging.plan --sample 0").transcript(),
        sh.run("fillgate apply reconcile-staging.plan --target staging").transcript(),
    )
    canary = sh.run("fillgate apply reconcile-live.plan --confirm live --canary 4")
    s["production-canary.txt"] = canary.transcript()
    run_id = first_ulid(canary.output, "Apply run ")
    s["production-resume.txt"] = sh.run(f"fillgate resume {run_id} --target live --confirm live").transcript()
    s["production-report.md"] = sh.run(f"fillgate show {run_id} --target live --format markdown").output
    return s


def lint(work: Path) -> dict[str, str]:
    folder = fresh(work, "lint", "lint")
    sh = Shell(folder)
    return {
        "lint.txt": sh.run("fillgate lint jobs/", expect=1).transcript(exit_code=True),
        "lint-json.txt": sh.run("fillgate lint jobs/ --json 2>/dev/null | head -12", expect=0).transcript(),
    }


class _Webhook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem + "_docs", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def albums(work: Path) -> dict[str, str]:
    """Enrichment with a lookup: the unexpected_index bucket, events, alerts, holds."""
    folder = fresh(work, "albums", "albums")
    service_module = _load(folder / "service.py")
    service = service_module.start(0)
    webhook = ThreadingHTTPServer(("127.0.0.1", 0), _Webhook)
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    _Webhook.received = []
    url = f"http://127.0.0.1:{service.server_port}/lookup"
    sh = Shell(folder, FILLGATE_ALERT_WEBHOOK=f"http://127.0.0.1:{webhook.server_port}/alerts")
    s: dict[str, str] = {}
    try:
        sh.run("python seed.py albums.db && fillgate init")
        run = sh.run(f"fillgate run enrich.py:FillAlbumTitle --param service={url} --events events.jsonl", expect=1)
        s["albums-run.txt"] = run.transcript(exit_code=True)
        plan_run = first_ulid(run.output, "Plan ")
        apply_run = first_ulid(run.output, "Apply run ")
        s["albums-show.txt"] = sh.run(f"fillgate show {plan_run}").transcript()
        s["albums-show-json.txt"] = sh.run(
            f"fillgate show {plan_run} --json | jq -c '.counts.unexpected_index, .details.first_mismatch, "
            ".details.slowest[:2]'").transcript()
        s["albums-events.txt"] = join(
            sh.run("jq -c 'select(.event==\"batch_done\") | {batch, writes, unexpected_index}' events.jsonl")
            .transcript(),
            sh.run("head -2 events.jsonl").transcript(),
            sh.run("tail -1 events.jsonl").transcript(),
        )
        s["albums-events-filters.txt"] = join(
            sh.run("jq -c 'select(.unexpected_index > 0 or .errors > 0) | {run_id, batch, unexpected_index}' "
                   "events.jsonl").transcript(),
            sh.run("jq -r 'select(.event==\"run_finished\") | \"\\(.run_id) \\(.status) \\(.totals)\"' "
                   "events.jsonl").transcript(),
        )
        alerts = [a for a in _Webhook.received if a.get("run_id") == plan_run]
        if len(alerts) != 1:
            raise SystemExit(f"expected one alert for run {plan_run}, got {_Webhook.received}")
        s["albums-alert.json"] = json.dumps(alerts[0], indent=2, ensure_ascii=False)

        # throttling: revert, fix the service, plan again, then apply while a flag holds the run
        sh.run(f"fillgate revert {apply_run}")
        service_module.Handler.swap = False
        sh.run(f"fillgate plan enrich.py:FillAlbumTitle --param service={url} -o fill.plan")
        db = folder / "albums.db"

        def set_hold(value: int) -> None:
            with sqlite3.connect(db) as conn:
                conn.execute("UPDATE control_flag SET hold = ?", (value,))

        set_hold(1)
        timer = threading.Timer(2.0, set_hold, (0,))
        timer.start()
        hold_cmd = ("fillgate apply fill.plan --batch-size 100 --hold-while \"SELECT hold FROM control_flag\" "
                    "--events hold.jsonl")
        held = sh.run(hold_cmd)
        timer.join()
        s["albums-hold.txt"] = join(
            held.transcript(),
            sh.run("jq -c 'select(.event==\"run_held\" or .event==\"batch_done\") | {event, batch, reason, held_ms}' "
                   "hold.jsonl").transcript(),
        )
        held_run = first_ulid(held.output, "Apply run ")
        sh.run(f"fillgate revert {held_run}")
        sh.run(f"fillgate plan enrich.py:FillAlbumTitle --param service={url} -o fill2.plan")
        set_hold(1)
        stop = sh.run("fillgate apply fill2.plan --batch-size 100 --hold-while \"SELECT hold FROM control_flag\" "
                      "--max-hold 1", expect=3)
        stopped_run = first_ulid(stop.output, "resume ")
        resume = sh.run(f"fillgate resume {stopped_run} --hold-while \"SELECT hold FROM control_flag\" --max-hold 1",
                        expect=3)
        set_hold(0)
        s["albums-max-hold.txt"] = join(
            stop.transcript(exit_code=True),
            resume.transcript(exit_code=True),
            "$ sqlite3 albums.db \"UPDATE control_flag SET hold = 0\"",
            sh.run(f"fillgate resume {stopped_run}").transcript(),
        )
    finally:
        service.shutdown()
        webhook.shutdown()
    return s


def flights(work: Path) -> dict[str, str]:
    """Values checked against their column's type at plan time, on SQLite."""
    folder = fresh(work, "flights", "flights")
    sh = Shell(folder)
    sh.run("python seed.py sqlite:///flights.db && printf '[targets.staging]\\nurl = \"sqlite:///flights.db\"\\n' "
           "> fillgate.toml && fillgate init")
    return {"flights-sqlite.txt": sh.run("fillgate plan flights.py:FixFlights -o dest.plan", expect=1).transcript(
        exit_code=True)}


def postgres_url() -> str | None:
    return os.environ.get("FILLGATE_DOCS_POSTGRES_URL") or os.environ.get("FILLGATE_TEST_POSTGRES_URL")


def flights_pg(work: Path) -> dict[str, str]:
    """The same job on PostgreSQL (needs FILLGATE_DOCS_POSTGRES_URL or FILLGATE_TEST_POSTGRES_URL):
    a scratch database fillgate_docs_<pid> is created and dropped."""
    import sqlalchemy as sa

    url = postgres_url()
    if url is None:
        raise SystemExit("the flights_pg session needs FILLGATE_DOCS_POSTGRES_URL or FILLGATE_TEST_POSTGRES_URL")
    admin_url = sa.make_url(url).set(drivername="postgresql+psycopg")
    name = f"fillgate_docs_{os.getpid()}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    try:
        folder = fresh(work, "flights-pg", "flights")
        db_url = admin_url.set(database=name)
        (folder / "fillgate.toml").write_text(
            f'[targets.staging]\nurl = "{db_url.set(drivername="postgresql").render_as_string(False)}"\n')
        sh = Shell(folder)
        sh.run(f"python seed.py '{db_url.render_as_string(False)}' && fillgate init")
        return {"flights-postgresql.txt": join(
            sh.run("fillgate plan flights.py:FixFlights -o dest.plan", expect=1).transcript(exit_code=True),
            sh.run("grep '\"kind\":\"error\"' dest.plan").transcript(),
        )}
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


EXAMPLES = {
    "example-enrichment-pipeline.txt": "enrichment_pipeline",
    "example-stale-classifications.txt": "stale_classifications",
    "example-run-identity.txt": "run_identity",
    "example-album-lookup.txt": "album_lookup",
}


def examples(work: Path) -> dict[str, str]:
    """The four incident examples, on SQLite, whole."""
    sh = Shell(REPO)
    out = {name: sh.run(f"python examples/{folder}/demo.py").transcript() for name, folder in EXAMPLES.items()}
    # the album demo in every mode of its faulty service, as a table of what each side wrote
    wide = Shell(REPO, COLUMNS="400")
    rows = ["| `--mode` | before.py: wrong values (albums) | fillgate: wrong values | `unexpected_index` | alerts |",
            "| --- | --- | --- | --- | --- |"]
    for mode in ("drop", "swap", "short", "duplicate", "ok"):
        text = wide.run(f"python examples/album_lookup/demo.py --mode {mode}").output
        before = re.search(r"(\d+) wrong values on (\d+) albums", text)
        numbers = [re.search(pattern, text) for pattern in (r"wrong values written: (\d+)",
                                                             r"unexpected_index: (\d+) rows",
                                                             r"alerts received by the webhook: (\d+)")]
        if not all(numbers) or (before is None and "no wrong values" not in text):
            raise SystemExit(f"the album demo's summary changed (mode {mode}):\n{text}")
        wrong = f"{before.group(1)} ({before.group(2)})" if before else "0"
        rows.append(f"| `{mode}` | {wrong} | " + " | ".join(m.group(1) for m in numbers if m) + " |")
    out["example-album-modes.md"] = "\n".join(rows)
    return out


SESSIONS: dict[str, Callable[[Path], dict[str, str]]] = {
    "tour": tour, "people": people, "lint": lint, "albums": albums, "flights": flights, "flights_pg": flights_pg,
    "examples": examples, "production": production,
}
# sessions that need a database server; left out (and their snippets kept) when it is not configured
OPTIONAL = {"flights_pg": postgres_url}

# --------------------------------------------------------------------------------------------
# comparing


def normalise(text: str, work: Path | str = WORK) -> str:
    """What must be equal between two real runs: everything but ids, times, durations,
    temporary paths, ports, hashes over those, the per-row timings (and so the order) of
    'slowest rows', and the layout (column widths, wrapping)."""
    text = text.replace(str(work), "<WORK>").replace(str(REPO), "<REPO>")
    text = re.sub(r"/tmp/(fillgate|tmp|pytest)[\w.-]*", "<TMP>", text)
    text = re.sub(ULID, "<ULID>", text)
    text = re.sub(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?Z?", "<TIME>", text)
    text = re.sub(r"\b[0-9a-f]{64}\b", "<SHA256>", text)
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<PORT>", text)
    text = re.sub(r'"(elapsed_ms|held_ms|duration_ms|ms)": ?[\d.]+', r'"\1": <MS>', text)
    text = re.sub(r'"(trial_s|rate|duration_s)": ?[\d.]+', r'"\1": <MEASURED>', text)
    text = re.sub(r"\b\d+(\.\d+)? (changes|rows)/s\b", r"<RATE> \2/s", text)  # a trial batch's measured rate
    text = re.sub(r"\b\d+[hm] \d+[ms]\b", "<DURATION>", text)  # an estimated duration: 12m 5s, 3h 20m
    text = re.sub(r"\b\d+(\.\d+)? ?(ms|s)\b", "<DURATION>", text)
    text = re.sub(r"\"slowest\": ?\[.*?\]", '"slowest": <SLOWEST>', text)
    text = re.sub(r'\[\{"key":\[\d+\],"ms":.*', "<SLOWEST>", text)
    # the rows of a 'slowest rows' table: their times and so their order change from run to run
    text = re.sub(r"(slowest rows[^\n]*\n(?:[┏┃┡][^\n]*\n)*)(?:│[^\n]*\n)+", r"\1<SLOWEST ROWS>\n", text)
    # how often a hold is re-checked (and so reported) during a timed hold depends on the machine
    text = re.sub(r"(held: [^\n]*\n)(?:held: [^\n]*\n)+", r"\1", text)
    held = r'\{"event": ?"run_held", ?"batch": ?'
    text = re.sub(rf"({held}(\d+),[^\n]*\n)(?:{held}\2,[^\n]*\n)+", r"\1", text)
    text = re.sub(r"[━─═]+", "─", text)
    text = re.sub(r"\s+", " ", text)
    return text.strip()


# --------------------------------------------------------------------------------------------
# README: its output blocks are copies of snippets

README_BLOCK = re.compile(r"(?P<open><!-- snippet: (?P<name>[\w.-]+) -->\n```[a-z]*\n)(?P<body>(?:[^\n]*\n)*?)"
                          r"(?P<close>```\n<!-- /snippet -->)")


def readme_with_snippets(readme: str, snippets: dict[str, str]) -> str:
    def repl(match: re.Match[str]) -> str:
        return match.group("open") + snippets[match.group("name")].rstrip("\n") + "\n" + match.group("close")

    return README_BLOCK.sub(repl, readme)


def generate(out: Path, work: Path, only: list[str] | None = None) -> dict[str, str]:
    work.mkdir(parents=True, exist_ok=True)
    produced: dict[str, str] = {}
    for name, session in SESSIONS.items():
        if only and name not in only:
            continue
        if name in OPTIONAL and OPTIONAL[name]() is None:
            print(f"skipped session {name}: {session.__doc__.splitlines()[-1].strip()}", file=sys.stderr)
            continue
        produced.update(session(work))
    out.mkdir(parents=True, exist_ok=True)
    for name, text in produced.items():
        (out / name).write_text(text.rstrip("\n") + "\n")
    return produced


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="where the snippet files go (default: docs/_snippets)")
    parser.add_argument("--work", type=Path, default=WORK, help="where the runs happen (default: /tmp/fillgate-docs)")
    parser.add_argument("--only", action="append", choices=sorted(SESSIONS), help="run only these sessions")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    args = parser.parse_args()
    for tool in ("jq", "sqlite3"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (apt-get install {tool}); the docs show its output")
    generate(args.out, args.work, args.only)
    if args.out == OUT and not args.no_readme:
        snippets = {p.name: p.read_text().rstrip("\n") for p in OUT.iterdir()}
        README.write_text(readme_with_snippets(README.read_text(), snippets))
    print(f"snippets written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
