"""Example 2, "Stale agent classifications": the three jobs that replace the incident's scripts.

    fillgate plan examples/stale_classifications/jobs.py:CrawlerUpdate --target demo -o crawler.plan
    fillgate run  examples/stale_classifications/jobs.py:ReconcileAgentTypes --target demo --max-changes 25
    fillgate run  examples/stale_classifications/jobs.py:ReprobeAgentTypes --target demo --max-changes 25

* ``CrawlerUpdate``: the crawler's update rule. ``Promote(unknown=["unknown"])`` writes a type
  where none is stored (NULL or 'unknown'); where a known stored type differs from the
  inferred one it records a *disagreement* and does not flip it.
* ``ReconcileAgentTypes``: the explicit reconcile backfill. ``Overwrite`` flips every stored
  type that differs from what the capability snapshot implies, so it runs behind a dry run
  and ``--max-changes``. ``--param rule=name`` swaps the classifier for a keyword rule on the
  agent's name (a plausible shortcut that is badly wrong): the gate refuses it.
  Its ``verify`` reads back the rows a canary apply changed (docs: Running on production).
* ``ReprobeAgentTypes``: asks every agent's probe endpoint for its type, with a timeout. A
  probe that times out, fails DNS or errors returns ``Failed(...)``: the stored type is
  *preserved*, never replaced by NULL. It is a ``Promote`` too: one probe never flips a
  known type. The engine records each agent's probe time; the slowest are in ``fillgate show``.

The jobs reach the database only through fillgate (``fillgate lint`` finds nothing here).
"""

from __future__ import annotations

from typing import Any

from stale_agents import ProbeFailed, infer_type, name_rule_type, probe_agent

from fillgate import Failed, Job, Overwrite, Param, Promote, UsageError

UNKNOWN = ["unknown"]  # the stored marker that means "no type yet"

RULES = {"skills": "the capability classifier", "name": "a keyword rule on the agent's name"}


class CrawlerUpdate(Job):
    """Promote missing/unknown types from the capability snapshot; record disagreements."""

    name = "crawler-update"
    table = "agents"
    key = ("id",)
    columns = {"agent_type": Promote(unknown=UNKNOWN)}
    source = "SELECT id, agent_type, capabilities FROM agents"

    def compute(self, row: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {"agent_type": infer_type(row["capabilities"])}


class ReconcileAgentTypes(Job):
    """Overwrite every stored type that differs from the one the snapshot implies."""

    name = "reconcile-agent-types"
    table = "agents"
    key = ("id",)
    # 'unknown' is a marker, not a type: an inferred 'unknown' never overwrites a known type.
    columns = {"agent_type": Overwrite(unknown=UNKNOWN)}
    source = "SELECT id, name, agent_type, capabilities FROM agents"
    params = {"rule": Param(str, default="skills", help="skills (the classifier) or name (keyword rule)")}

    def __init__(self, params: dict[str, Any] | None = None) -> None:
        super().__init__(params)
        if self.args["rule"] not in RULES:
            raise UsageError(f"rule must be one of {', '.join(RULES)}, got {self.args['rule']!r}.")

    def compute(self, row: dict[str, Any], ctx: Any) -> dict[str, Any]:
        if self.args["rule"] == "name":
            return {"agent_type": name_rule_type(row["name"])}
        return {"agent_type": infer_type(row["capabilities"])}

    def verify(self, ctx: Any, changed_keys: list[tuple[Any, ...]]) -> str | None:
        """The canary check (``fillgate apply PLAN --canary N``): every agent the canary
        changed now holds the type its capability snapshot implies, read back from the table."""
        wrong = []
        for (agent_id,) in changed_keys:
            (row,) = ctx.execute("SELECT agent_type, capabilities FROM agents WHERE id = :id", id=agent_id)
            if row["agent_type"] != infer_type(row["capabilities"]):
                wrong.append(f"agent {agent_id} is {row['agent_type']!r}")
        return "; ".join(wrong) or None


class ReprobeAgentTypes(Job):
    """Ask each agent for its type; a failed probe keeps the stored type."""

    name = "reprobe-agent-types"
    table = "agents"
    key = ("id",)
    columns = {"agent_type": Promote(unknown=UNKNOWN)}
    source = "SELECT id, agent_type, probe_url FROM agents"
    params = {"timeout": Param(float, default=0.2, help="seconds to wait for one probe")}
    page_size = 100

    def compute(self, row: dict[str, Any], ctx: Any) -> dict[str, Any]:
        try:
            answer = probe_agent(row["probe_url"], timeout=self.args["timeout"])
        except ProbeFailed as exc:
            return {"agent_type": Failed(f"probe {exc}")}
        reported = answer.get("agent_type")
        if reported not in ("buying", "sales", "unknown"):
            return {"agent_type": Failed(f"probe answered {reported!r}")}
        return {"agent_type": reported}
