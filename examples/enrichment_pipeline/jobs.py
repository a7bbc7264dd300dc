"""Example 1, "Staged enrichment pipeline aimed at the wrong environment": the fillgate version.

    fillgate run  examples/enrichment_pipeline/jobs.py:EnrichPeople --target staging
    fillgate plan examples/enrichment_pipeline/jobs.py:EnrichPeople --target staging   # writes nothing
    fillgate revert PIPELINE_RUN --target staging

The eight stages of ``before.py``, as fillgate jobs in a :class:`~fillgate.pipeline.Pipeline`.
Each stage reaches the database only through ``ctx`` (it inherits the pipeline's target and
run id), is additive (``FillMissing``, or insert jobs that only add missing link rows) and
idempotent: a second run changes nothing.

1. ``FillProfile``           people.full_name / bio / skills from the raw profile JSON
2. ``LinkEducation``         education -> institutions     (insert into education_institutions)
3. ``LinkWork``              work -> companies             (insert into work_companies)
4. ``LinkCertifications``    certifications -> institutions (insert into certification_issuers)
5. ``LinkProjects``          projects -> companies         (insert into project_companies)
6. ``LinkHonors``            honors -> institutions        (insert into honor_issuers)
7. ``LinkVolunteering``      volunteering -> institutions  (insert into volunteering_organizations)
8. ``CompleteEnrichment``    people.best_current_role, and enrichment_status = 'complete' once
                             every record of the person is linked

The link stages read one person per source row (``source_key = ("person_id",)``), so a crash
while resolving one person's records is a row error under that person's key, in that stage;
their links are not written and everyone else carries on. Each link table's conflict key,
e.g. ``(work_id, company_id)``, is verified against its UNIQUE constraint before anything runs.

``EnrichPeopleViaRoleEndpoint`` is the incident kept on purpose: its last stage asks for the
roles through the "role endpoint" whose target is hard-coded to ``live``. fillgate refuses it
(exit 3) before that stage writes anything, naming the stage; ``fillgate lint`` finds the line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from enrichment_world import CURRENT_ROLES_SQL, LINKS, best_role, org_index, profile_fields, resolve, unlinked_sql

from fillgate import FillMissing, Job, Pipeline

PAGE = 20  # people per page: one lookup query per page and stage


class FillProfile(Job):
    """Stage 1: fill missing names, bios and skills from the imported profile."""

    name = "enrich.fill-profile"
    table = "people"
    columns = {"full_name": FillMissing(), "bio": FillMissing(), "skills": FillMissing()}
    source = "SELECT id, full_name, bio, skills, raw_profile FROM people"
    page_size = PAGE

    def compute(self, row: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return profile_fields(row["raw_profile"])


class LinkRecords(Job):
    """Stages 2-7: link each of a person's records to its organisation (insert jobs).

    Subclasses set ``kind`` (a key of ``enrichment_world.LINKS``); ``table``, ``key`` and
    ``columns`` follow from it."""

    kind: str = ""
    writes = "insert"
    source = "SELECT id AS person_id FROM people"
    source_key = ("person_id",)
    columns = {"matched_by": FillMissing()}
    page_size = PAGE

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        link = LINKS[cls.kind]
        cls.table = link.link
        cls.key = (link.record_fk, link.org_fk)  # the link table's UNIQUE constraint
        cls.name = f"enrich.link-{cls.kind}"

    def compute_batch(self, rows: Sequence[dict[str, Any]], ctx: Any) -> list[Any]:
        link = LINKS[self.kind]
        if not hasattr(self, "_orgs"):
            self._orgs = org_index(ctx.execute(f"SELECT id, name, aliases FROM {link.orgs}"))
        ids = [row["person_id"] for row in rows]
        records = ctx.execute(
            f"SELECT id, person_id, {link.org_column} AS org FROM {link.records} "
            "WHERE person_id BETWEEN :lo AND :hi ORDER BY id", lo=min(ids), hi=max(ids))
        out: list[Any] = []
        for person_id in ids:
            try:
                links = []
                for record in (r for r in records if r["person_id"] == person_id):
                    found = resolve(record["org"], self._orgs)
                    if found is not None:
                        links.append({link.record_fk: record["id"], link.org_fk: found[0], "matched_by": found[1]})
                out.append(links or None)
            except Exception as exc:  # this person's error; the rest of the page carries on
                out.append(exc)
        return out


class LinkEducation(LinkRecords):
    kind = "education"


class LinkWork(LinkRecords):
    kind = "work"


class LinkCertifications(LinkRecords):
    kind = "certifications"


class LinkProjects(LinkRecords):
    kind = "projects"


class LinkHonors(LinkRecords):
    kind = "honors"


class LinkVolunteering(LinkRecords):
    kind = "volunteering"


class CompleteEnrichment(Job):
    """Stage 8: the best current role, and 'complete' once every record is linked.

    It reads what stages 1-7 wrote (the linked current jobs, the unlinked count)."""

    name = "enrich.complete"
    table = "people"
    columns = {"best_current_role": FillMissing(), "enrichment_status": FillMissing()}
    source = (f"SELECT p.id, p.full_name, p.best_current_role, p.enrichment_status, ({unlinked_sql()}) AS unlinked "
              "FROM people p")
    page_size = PAGE

    def current_jobs(self, ids: list[int], ctx: Any) -> list[dict[str, Any]]:
        return ctx.execute(CURRENT_ROLES_SQL, lo=min(ids), hi=max(ids))

    def compute_batch(self, rows: Sequence[dict[str, Any]], ctx: Any) -> list[Any]:
        jobs = self.current_jobs([row["id"] for row in rows], ctx)
        out = []
        for row in rows:
            done = row["full_name"] is not None and row["unlinked"] == 0
            out.append({"best_current_role": best_role([j for j in jobs if j["person_id"] == row["id"]]),
                        "enrichment_status": "complete" if done else None})
        return out


STAGES = [FillProfile, LinkEducation, LinkWork, LinkCertifications, LinkProjects, LinkHonors, LinkVolunteering,
          CompleteEnrichment]


class EnrichPeople(Pipeline):
    """The eight stages, in order, on the caller's target under one run id."""

    name = "enrich-people"
    stages = STAGES


# --- the incident, kept on purpose -----------------------------------------------------------

ROLE_ENDPOINT_HEADERS = {"X-Target": "live"}  # THE BUG, as in before.py: a hard-coded target


class CompleteEnrichmentViaRoleEndpoint(CompleteEnrichment):
    """Stage 8 as the incident wrote it: the roles come from the "role endpoint", whose
    target is hard-coded to live. fillgate refuses it before it writes anything."""

    name = "enrich.complete-via-role-endpoint"

    def current_jobs(self, ids: list[int], ctx: Any) -> list[dict[str, Any]]:
        endpoint = ctx.open_target(ROLE_ENDPOINT_HEADERS["X-Target"])
        with endpoint.connect() as conn:
            return [dict(r) for r in conn.exec_driver_sql(CURRENT_ROLES_SQL).mappings()]


class EnrichPeopleViaRoleEndpoint(Pipeline):
    name = "enrich-people-via-role-endpoint"
    stages = [*STAGES[:-1], CompleteEnrichmentViaRoleEndpoint]
