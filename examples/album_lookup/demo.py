"""Example 4, end to end: a misaligned bulk album lookup, without and with fillgate.

    python examples/album_lookup/demo.py [--url DATABASE_URL] [--mode swap] [--albums 300]

1. Seeds an ``albums`` table (default: a new SQLite file; ``--url`` replaces the ``albums``
   table of that database) and starts the bulk lookup service on a free localhost port, in a
   faulty mode (``drop``, ``swap``, ``short``, ``duplicate``; or ``ok``).
2. Runs the original script (``before.py``): it writes by position and puts album A's
   metadata on album B, silently.
3. Resets the table and runs the same backfill with fillgate (``jobs.py``): zero wrong writes,
   every misaligned row counted as ``unexpected_index``, exactly one alert per affected batch
   (received by a local webhook), and the first mismatch in ``fillgate show``.
4. Switches the service back to ``ok`` and runs again: the albums left out are filled, and
   nothing alerts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the example's own modules, next to this file

import before
import service
from jobs import FillAlbumMetadata

from fillgate import Alerter, Limits, Monitor, Target, WebhookSink, apply_plan, connect, init_target, make_plan, report

POISON = (62, 71, 188)  # albums whose batch the faulty service answers wrongly (batches 2 and 4)
JOB = "examples/album_lookup/jobs.py:FillAlbumMetadata"


def _step(console: Console, number: int, title: str, command: str | None = None) -> None:
    console.print()
    body = f"[bold]{title}[/]" + (f"\n[dim]$ {command}[/]" if command else "")
    console.print(Panel(body, title=f"step {number}", title_align="left"))


def _wrong_table(wrong: list[dict[str, object]], limit: int = 8) -> Table:
    t = Table(title=f"first {min(limit, len(wrong))} of {len(wrong)} wrong values", title_justify="left")
    for col in ("album", "column", "written", "should be", "belongs to album"):
        t.add_column(col)
    for item in wrong[:limit]:
        t.add_row(str(item["id"]), str(item["column"]), str(item["value"]), str(item["expected"]),
                  str(item["belongs_to"]))
    return t


def run(url: str | None, mode: str, albums: int, console: Console) -> int:
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="fillgate-albums-"))
    url = url or f"sqlite:///{workdir / 'albums.db'}"
    target = Target.from_url("demo", url)
    engine = sa.create_engine(target.url)
    svc = service.AlbumService(mode, POISON).start()
    inbox = service.AlertInbox().start()
    try:
        batches = -(-albums // FillAlbumMetadata.page_size)
        console.print(
            f"[bold]Example 4: misaligned bulk album lookup.[/] {albums} albums in {target.safe_url}, "
            f"metadata missing (genre, release_year, label, catalog_no; every 10th album already has "
            f"its label). The lookup service on {svc.url} is in mode [bold]{mode}[/]: the batches holding "
            f"albums {', '.join(map(str, POISON))} come back wrong."
        )

        # --- 1. the original script ---------------------------------------------------
        service.create_albums(engine, albums)
        _step(console, 1, "BEFORE: the original script writes results by position, zip(batch, results)",
              f"python examples/album_lookup/before.py --url {target.safe_url} --service {svc.url}")
        counts = before.backfill(url, svc.url, batch_size=FillAlbumMetadata.page_size)
        console.print(f"done: {counts['albums']} albums in {counts['batches']} batches, {counts['updated']} updated")
        wrong = service.wrong_values(engine)
        victims = sorted({int(str(w["id"])) for w in wrong})
        if wrong:
            console.print(
                f"[bold red]{len(wrong)} wrong values on {len(victims)} albums[/] "
                f"({', '.join(map(str, victims[:12]))}{' …' if len(victims) > 12 else ''}), "
                "and the script said nothing: no error, no count, no alert."
            )
            console.print(_wrong_table(wrong))
        else:
            console.print("[green]no wrong values[/] (the service answered every batch correctly)")
        before_affected = svc.affected()

        # --- 2. the same backfill with fillgate ------------------------------------------------
        service.create_albums(engine, albums)
        svc.reset_log()
        _step(console, 2, "Reset the table; the same backfill WITH fillgate (the lookup is checked: "
              "result.index == i)", "fillgate init --target demo")
        report.print_init(console, init_target(target))
        conn = connect(target)
        monitor = Monitor(alerter=Alerter([WebhookSink(inbox.url + "/fillgate")]))
        plan_file = workdir / "albums.plan"
        params = {"service_url": svc.url}
        console.print(f"[dim]$ fillgate plan {JOB} --target demo --param service_url={svc.url} -o {plan_file}[/]")
        planned = make_plan(conn, FillAlbumMetadata, params, out=plan_file, monitor=monitor)
        report.print_plan(console, planned, sample=3)
        console.print(f"[dim]$ fillgate apply {plan_file} --max-changes {planned.header.changes}[/]")
        applied = apply_plan(conn, plan_file, Limits(max_changes=planned.header.changes), monitor=monitor)
        report.print_apply(console, applied)

        # --- 3. what fillgate did ---------------------------------------------------------------
        _step(console, 3, "What happened")
        wrong_after = service.wrong_values(engine)
        affected = svc.affected()
        unexpected = planned.counts["unexpected_index"]
        alerts = list(inbox.alerts)
        faulty_batches = [n + 1 for n, call in enumerate(svc.calls) if call.faulty]
        ok = "[green]✓[/]"
        bad = "[bold red]✗[/]"
        console.print(f"{ok if not wrong_after else bad} wrong values written: {len(wrong_after)}")
        listed = f" ({', '.join(map(str, affected[:12]))}{' …' if len(affected) > 12 else ''})" if affected else ""
        console.print(
            f"{ok if unexpected == len(affected) else bad} unexpected_index: {unexpected} rows, "
            f"= the {len(affected)} rows the service answered out of place{listed}; none written"
        )
        console.print(
            f"{ok if [a['batch'] for a in alerts] == faulty_batches else bad} alerts received by the webhook: "
            f"{len(alerts)}, one per affected batch ({len(faulty_batches)} of {batches} batches), "
            f"never one per row"
        )
        for alert in alerts:
            console.print(f"   batch {alert['batch']}  kind {alert['kind']}  "
                          f"unexpected_index {alert['counts']['unexpected_index']}  "
                          f"fingerprint {alert['fingerprint']}")
        if alerts:
            console.print(f"   message: {alerts[0]['message']}")
        console.print(f"[dim]$ fillgate show {planned.run.run_id} --target demo[/]")
        report.print_show(console, conn.ledger.get_run(planned.run.run_id),
                          conn.ledger.error_groups(planned.run.run_id))

        # --- 4. the service is fixed: run again --------------------------------------------
        _step(console, 4, "The service is fixed (mode ok): run again; the albums left out are filled"
              if mode != "ok" else "Run again (mode ok): nothing is left to fill",
              f"fillgate run {JOB} --target demo --param service_url={svc.url}")
        svc.set_mode("ok")
        inbox.clear()
        again = make_plan(conn, FillAlbumMetadata, params, out=workdir / "again.plan", monitor=monitor)
        report.print_plan(console, again, sample=0)
        reapplied = apply_plan(conn, workdir / "again.plan", monitor=monitor)
        report.print_apply(console, reapplied)
        with engine.connect() as c:
            missing = c.execute(sa.text("SELECT count(*) FROM albums WHERE catalog_no IS NULL")).scalar()
        final_wrong = service.wrong_values(engine)
        console.print(f"albums still missing metadata: {missing}; wrong values: {len(final_wrong)}; "
                      f"alerts: {len(inbox.alerts)}")
        good = (not wrong_after and not final_wrong and missing == 0 and unexpected == len(affected)
                and [a["batch"] for a in alerts] == faulty_batches and (mode == "ok" or bool(before_affected)))
        console.print(f"\n[{'green' if good else 'red'}]Done in {time.perf_counter() - started:.1f}s.[/] "
                      f"Database: {target.safe_url}")
        return 0 if good else 1
    finally:
        svc.stop()
        inbox.stop()
        engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Example 4: a misaligned bulk album lookup, without/with fillgate.")
    parser.add_argument("--url", help="database URL (default: a new SQLite file); its albums table is replaced")
    parser.add_argument("--mode", choices=service.MODES, default="swap", help="the service's fault (default: swap)")
    parser.add_argument("--albums", type=int, default=300, help="albums to seed (default: 300)")
    args = parser.parse_args(argv)
    return run(args.url, args.mode, args.albums, Console(highlight=False))


if __name__ == "__main__":
    sys.exit(main())
