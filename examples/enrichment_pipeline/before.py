"""Example 1, BEFORE fillgate: the QA enrichment sweep that ran against live.

The sweep is meant for staging: it reads the people of the target it is given and, for each
one, calls the enrichment endpoint, which runs the eight enrichment stages for that person.
But the endpoint's caller copied its headers from the production runbook: ``X-Target: live``
is hard-coded, and the endpoint opens whatever database the header names. So a sweep "on
staging" enriches live: eight stages of unreviewed, unaudited writes to production, while
staging stays untouched and the QA report says all is well. Nothing in the stack checked
which database the nested call really reached.

    STAGING_DATABASE_URL=sqlite:///staging.db LIVE_DATABASE_URL=sqlite:///live.db \\
        python examples/enrichment_pipeline/before.py --target staging

(This is the incident's code, kept as it was; do not copy it. ``jobs.py`` is the fix, and
``fillgate lint examples/enrichment_pipeline/before.py`` finds the bug without running it.)
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import sqlalchemy as sa
from enrichment_world import (
    CURRENT_ROLES_SQL,
    LINKS,
    best_role,
    driver_url,
    org_index,
    profile_fields,
    resolve,
    unlinked_sql,
)

DATABASES = {  # where each environment lives (the defaults are the team's real hosts)
    "staging": os.environ.get("STAGING_DATABASE_URL", "postgresql://qa@db-staging.internal/people"),
    "live": os.environ.get("LIVE_DATABASE_URL", "postgresql://enrich@db-live.internal/people"),
}

ENRICH_HEADERS = {"X-Target": "live"}  # THE BUG: copied from the production runbook


def database_url(target: str) -> str:
    return os.environ.get(f"{target.upper()}_DATABASE_URL") or DATABASES[target]


def enrich_person_endpoint(person_id: int, headers: dict[str, str]) -> dict[str, int]:
    """The nested enrichment endpoint: the eight stages for one person, on the database its
    ``X-Target`` header names."""
    engine = sa.create_engine(driver_url(database_url(headers.get("X-Target", "staging"))))
    written = {"fields": 0, "links": 0}
    try:
        with engine.begin() as conn:
            row = conn.execute(sa.text("SELECT * FROM people WHERE id = :p"), {"p": person_id}).mappings().one()
            # 1. names, bios, skills (only where missing)
            for column, value in profile_fields(row["raw_profile"]).items():
                if row[column] is None and value is not None:
                    conn.execute(sa.text(f"UPDATE people SET {column} = :v WHERE id = :p"),
                                 {"v": value, "p": person_id})
                    written["fields"] += 1
            # 2.-7. link every record to its institution or company
            for link in LINKS.values():
                index = org_index(conn.execute(sa.text(f"SELECT id, name, aliases FROM {link.orgs}")).mappings().all())
                records = conn.execute(sa.text(f"SELECT id, {link.org_column} AS org FROM {link.records} "
                                               "WHERE person_id = :p"), {"p": person_id}).mappings().all()
                for record in records:
                    found = resolve(record["org"], index)
                    if found is None:
                        continue
                    exists = conn.execute(sa.text(f"SELECT 1 FROM {link.link} WHERE {link.record_fk} = :r "
                                                  f"AND {link.org_fk} = :o"),
                                          {"r": record["id"], "o": found[0]}).first()
                    if not exists:
                        conn.execute(sa.text(f"INSERT INTO {link.link} ({link.record_fk}, {link.org_fk}, matched_by) "
                                             "VALUES (:r, :o, :m)"), {"r": record["id"], "o": found[0], "m": found[1]})
                        written["links"] += 1
            # 8. best current role, and complete once every record is linked
            jobs = conn.execute(sa.text(CURRENT_ROLES_SQL), {"lo": person_id, "hi": person_id}).mappings().all()
            state = conn.execute(sa.text(f"SELECT p.full_name, p.best_current_role, p.enrichment_status, "
                                         f"({unlinked_sql()}) AS unlinked FROM people p WHERE p.id = :p"),
                                 {"p": person_id}).mappings().one()
            role = best_role(jobs)
            if state["best_current_role"] is None and role is not None:
                conn.execute(sa.text("UPDATE people SET best_current_role = :r WHERE id = :p"),
                             {"r": role, "p": person_id})
                written["fields"] += 1
            if state["enrichment_status"] is None and state["full_name"] and state["unlinked"] == 0:
                conn.execute(sa.text("UPDATE people SET enrichment_status = 'complete' WHERE id = :p"),
                             {"p": person_id})
                written["fields"] += 1
    finally:
        engine.dispose()
    return written


def qa_sweep(target: str = "staging", quiet: bool = False) -> dict[str, Any]:
    """Enrich every person of ``target``. Returns what the sweep believes it did."""
    engine = sa.create_engine(driver_url(database_url(target)))
    with engine.connect() as conn:
        person_ids = [r[0] for r in conn.execute(sa.text("SELECT id FROM people ORDER BY id"))]
    engine.dispose()
    report: dict[str, Any] = {"target": target, "people": 0, "fields": 0, "links": 0, "errors": []}
    for person_id in person_ids:
        try:
            written = enrich_person_endpoint(person_id, headers=ENRICH_HEADERS)
        except Exception as exc:  # log and carry on
            report["errors"].append((person_id, f"{type(exc).__name__}: {exc}"))
            continue
        report["people"] += 1
        report["fields"] += written["fields"]
        report["links"] += written["links"]
    if not quiet:
        print(f"QA sweep on {target}: {report['people']} people enriched, {report['fields']} fields filled, "
              f"{report['links']} links created, {len(report['errors'])} errors")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="staging", choices=sorted(DATABASES))
    qa_sweep(parser.parse_args().target)


if __name__ == "__main__":
    main()
