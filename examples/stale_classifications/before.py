"""The incident, the way the original team ran it: two plain scripts, no fillgate.

    python examples/stale_classifications/before.py crawler --url sqlite:///registry.db
    python examples/stale_classifications/before.py reprobe --url sqlite:///registry.db

``crawler_update`` is the crawler's write rule: it sets ``agent_type`` only where it is
missing. The classifier is right, but a row typed wrong before the classifier existed, or
marked 'unknown', is never looked at again: it stays wrong forever, however often it runs.

``naive_reprobe`` is the first fix someone wrote: probe every agent once and store its answer.
It overwrites a known type on a single (possibly flaky) probe, and a probe that times out or
fails DNS yields ``None``, which goes straight into the column as NULL, wiping a good value.
No dry run, no limit, no audit: afterwards nobody can say which agents it changed, or from what.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from stale_agents import ProbeFailed, infer_type, probe_agent


def crawler_update(engine: sa.Engine) -> int:
    """One crawler pass: type the agents that have none. Returns the number of rows updated."""
    updated = 0
    with engine.begin() as conn:
        rows = conn.execute(sa.text("SELECT id, agent_type, capabilities FROM agents ORDER BY id")).all()
        for agent_id, stored, capabilities in rows:
            if stored is None:  # the bug: 'unknown' and wrong types are never revisited
                conn.execute(sa.text("UPDATE agents SET agent_type = :t WHERE id = :id"),
                             {"t": infer_type(capabilities), "id": agent_id})
                updated += 1
    return updated


def naive_reprobe(engine: sa.Engine, timeout: float = 0.2) -> dict[str, Any]:
    """Probe every agent once and overwrite its type with the answer (None on failure)."""
    flipped: list[tuple[int, str | None, str | None]] = []
    with engine.begin() as conn:
        rows = conn.execute(sa.text("SELECT id, agent_type, probe_url FROM agents ORDER BY id")).all()
        for agent_id, stored, url in rows:
            try:
                answer: Mapping[str, Any] | None = probe_agent(url, timeout)
            except ProbeFailed:
                answer = None  # the bug: "no answer" becomes "no type"
            new = answer.get("agent_type") if answer else None
            if new != stored:
                conn.execute(sa.text("UPDATE agents SET agent_type = :t WHERE id = :id"),
                             {"t": new, "id": agent_id})
                flipped.append((agent_id, stored, new))
    return {"probed": len(rows), "changed": flipped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("script", choices=("crawler", "reprobe"))
    parser.add_argument("--url", required=True, help="the registry database")
    parser.add_argument("--timeout", type=float, default=0.2)
    args = parser.parse_args()
    url = args.url.replace("postgresql://", "postgresql+psycopg://", 1).replace("mysql://", "mysql+pymysql://", 1)
    engine = sa.create_engine(url)
    if args.script == "crawler":
        print(f"crawler: updated {crawler_update(engine)} agents")
    else:
        result = naive_reprobe(engine, args.timeout)
        for agent_id, old, new in result["changed"]:
            print(f"agent {agent_id}: {old} -> {new}")
        print(f"reprobe: probed {result['probed']} agents, changed {len(result['changed'])}")


if __name__ == "__main__":
    main()
