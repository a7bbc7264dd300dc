"""Example 1's world: a small person-enrichment schema, its deterministic seed, and the
enrichment logic shared by the "before" script (``before.py``) and the fillgate stages
(``jobs.py``). The logic was never the incident; where it wrote was.

Schema (SQLAlchemy Core, so it is the same on SQLite, PostgreSQL and MariaDB):

* ``people``: ``raw_profile`` (the imported JSON profile) and the enriched columns
  ``full_name``, ``bio``, ``skills``, ``best_current_role``, ``enrichment_status``.
* ``institutions`` (universities, certifiers, societies, non-profits) and ``companies``, each
  with a unique ``name`` and ``aliases`` (JSON list).
* a person's records: ``education``, ``work``, ``certifications``, ``projects``, ``honors``,
  ``volunteering``; each names its organisation as free text ("MIT", "Acme Corp.").
* link tables, one per kind of record, UNIQUE on (record, organisation):
  ``education_institutions``, ``work_companies``, ``certification_issuers``,
  ``project_companies``, ``honor_issuers``, ``volunteering_organizations``.

The seed (40 people) is deterministic. Person 13's current job was imported from a CSV with an
empty company cell: resolving it crashes (``'NoneType' object has no attribute 'casefold'``).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

N_PEOPLE = 40
CRASH_PERSON = 13  # their current job has no company name

metadata = sa.MetaData()

people = sa.Table(
    "people", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("handle", sa.String(80), nullable=False, unique=True),
    sa.Column("full_name", sa.String(200)),
    sa.Column("bio", sa.Text),
    sa.Column("skills", sa.String(500)),
    sa.Column("best_current_role", sa.String(300)),
    sa.Column("enrichment_status", sa.String(20)),
    sa.Column("raw_profile", sa.Text, nullable=False),
)
institutions = sa.Table(
    "institutions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("aliases", sa.Text, nullable=False),
)
companies = sa.Table(
    "companies", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("aliases", sa.Text, nullable=False),
)


def _records(name: str, org_column: str, *columns: sa.Column[Any]) -> sa.Table:
    return sa.Table(
        name, metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("person_id", sa.Integer, sa.ForeignKey("people.id"), nullable=False, index=True),
        sa.Column(org_column, sa.String(200)),  # free text, as imported
        *columns,
    )


education = _records("education", "school", sa.Column("degree", sa.String(100)),
                     sa.Column("start_year", sa.Integer), sa.Column("end_year", sa.Integer))
work = _records("work", "company", sa.Column("title", sa.String(100)),
                sa.Column("start_year", sa.Integer), sa.Column("end_year", sa.Integer))
certifications = _records("certifications", "issuer", sa.Column("name", sa.String(100)),
                          sa.Column("year", sa.Integer))
projects = _records("projects", "organization", sa.Column("name", sa.String(100)), sa.Column("year", sa.Integer))
honors = _records("honors", "issuer", sa.Column("title", sa.String(100)), sa.Column("year", sa.Integer))
volunteering = _records("volunteering", "organization", sa.Column("role", sa.String(100)),
                        sa.Column("start_year", sa.Integer))


@dataclass(frozen=True)
class LinkKind:
    """One kind of record and the link table that ties it to its organisation."""

    records: str  # the record table
    org_column: str  # its free-text organisation column
    orgs: str  # "institutions" or "companies"
    link: str  # the link table
    record_fk: str  # the link table's record column
    org_fk: str  # the link table's organisation column


LINKS: dict[str, LinkKind] = {
    "education": LinkKind("education", "school", "institutions", "education_institutions",
                          "education_id", "institution_id"),
    "work": LinkKind("work", "company", "companies", "work_companies", "work_id", "company_id"),
    "certifications": LinkKind("certifications", "issuer", "institutions", "certification_issuers",
                               "certification_id", "institution_id"),
    "projects": LinkKind("projects", "organization", "companies", "project_companies", "project_id", "company_id"),
    "honors": LinkKind("honors", "issuer", "institutions", "honor_issuers", "honor_id", "institution_id"),
    "volunteering": LinkKind("volunteering", "organization", "institutions", "volunteering_organizations",
                             "volunteering_id", "institution_id"),
}

for _kind in LINKS.values():
    sa.Table(
        _kind.link, metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(_kind.record_fk, sa.Integer, sa.ForeignKey(f"{_kind.records}.id"), nullable=False),
        sa.Column(_kind.org_fk, sa.Integer, sa.ForeignKey(f"{_kind.orgs}.id"), nullable=False),
        sa.Column("matched_by", sa.String(20), nullable=False),  # "name" or "alias"
        sa.UniqueConstraint(_kind.record_fk, _kind.org_fk, name=f"uq_{_kind.link}"),
    )

LINK_TABLES = [k.link for k in LINKS.values()]
ALL_TABLES = [t.name for t in metadata.sorted_tables]

# --- seed data ------------------------------------------------------------------------------

INSTITUTIONS = [
    ("Massachusetts Institute of Technology", "university", ["MIT"]),
    ("Stanford University", "university", ["Stanford"]),
    ("University of Cambridge", "university", ["Cambridge University"]),
    ("ETH Zurich", "university", ["ETH Zürich", "Swiss Federal Institute of Technology"]),
    ("Carnegie Mellon University", "university", ["CMU", "Carnegie Mellon"]),
    ("Linux Foundation", "certifier", ["The Linux Foundation"]),
    ("Cloud Native Computing Foundation", "certifier", ["CNCF"]),
    ("Association for Computing Machinery", "society", ["ACM"]),
    ("IEEE", "society", ["Institute of Electrical and Electronics Engineers"]),
    ("Code for America", "nonprofit", []),
    ("Wikimedia Foundation", "nonprofit", ["Wikimedia"]),
    ("Girls Who Code", "nonprofit", []),
]
COMPANIES = [
    ("Globex Corporation", ["Globex"]),
    ("Initech", ["Initech Inc."]),
    ("Acme Corporation", ["ACME", "Acme Corp."]),
    ("Hooli", ["Hooli XYZ"]),
    ("Umbrella Analytics", []),
    ("Stark Industries", ["Stark"]),
    ("Wayne Enterprises", ["Wayne Ent."]),
    ("Cyberdyne Systems", ["Cyberdyne"]),
    ("Soylent", ["Soylent Corp"]),
    ("Tyrell Corporation", ["Tyrell"]),
]
FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "John", "Radia", "Ken",
         "Margaret", "Tim", "Leslie", "Shafi", "Whitfield", "Hedy", "Katherine", "Dennis", "Sophie", "Niklaus"]
LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Backus", "Perlman", "Thompson",
        "Hamilton", "Berners-Lee", "Lamport", "Goldwasser", "Diffie", "Lamarr", "Johnson", "Ritchie", "Wilson",
        "Wirth"]
SKILLS = ["python", "sql", "rust", "go", "kubernetes", "compilers", "distributed systems", "cryptography",
          "data engineering", "security", "ml", "networking"]
TITLES = ["Software Engineer", "Senior Engineer", "Staff Engineer", "Engineering Manager", "Data Scientist",
          "Principal Engineer", "Research Scientist", "CTO"]
DEGREES = ["BSc Computer Science", "MSc Mathematics", "PhD Computer Science", "BEng Electrical Engineering"]
CERTS = [("Certified Kubernetes Administrator", "CNCF"), ("LFCS", "The Linux Foundation"),
         ("Certified Kubernetes Security Specialist", "Cloud Native Computing Foundation")]
HONORS = [("Turing Award", "ACM"), ("Fellow", "IEEE"), ("Distinguished Member", "Association for Computing Machinery")]
VOLUNTEER = [("Mentor", "Girls Who Code"), ("Civic hacker", "Code for America"), ("Editor", "Wikimedia")]
PROJECTS = ["Payments ledger", "Search relevance", "Edge cache", "Fraud model", "Build system"]


def _variant(rng: random.Random, name: str, aliases: Sequence[str]) -> str:
    """How a free-text import spells an organisation: its name, an alias, or a sloppy copy."""
    choice = rng.choice([name, name, *aliases, name.upper(), f"{name}."])
    return choice


def generate(n_people: int = N_PEOPLE, seed: int = 7) -> dict[str, list[dict[str, Any]]]:
    """Every table's seed rows (link tables empty), deterministically."""
    rng = random.Random(seed)
    data: dict[str, list[dict[str, Any]]] = {name: [] for name in ALL_TABLES}
    data["institutions"] = [{"id": i, "name": n, "kind": k, "aliases": json.dumps(a)}
                            for i, (n, k, a) in enumerate(INSTITUTIONS, start=1)]
    data["companies"] = [{"id": i, "name": n, "aliases": json.dumps(a)} for i, (n, a) in enumerate(COMPANIES, start=1)]
    unis = [(n, a) for n, k, a in INSTITUTIONS if k == "university"]
    ids = dict.fromkeys(("education", "work", "certifications", "projects", "honors", "volunteering"), 0)

    def add(table: str, **row: Any) -> None:
        ids[table] += 1
        data[table].append({"id": ids[table], **row})

    for pid in range(1, n_people + 1):
        first, last = FIRST[(pid - 1) % len(FIRST)], LAST[(pid * 7) % len(LAST)]
        skills = rng.sample(SKILLS, 3)
        raw = {"first_name": first, "last_name": last, "skills": skills,
               "summary": f"{first} works on {skills[0]} and {skills[1]}." if pid % 9 else None}
        data["people"].append({
            "id": pid, "handle": f"{first}-{last}-{pid}".lower(),
            "full_name": f"{first} {last}" if pid % 3 == 0 else None,  # a third already have a name
            "bio": raw["summary"] if pid % 4 == 0 else None,
            "skills": None, "best_current_role": None, "enrichment_status": None,
            "raw_profile": json.dumps(raw, sort_keys=True),
        })
        year = 2000 + pid % 10
        for _ in range(rng.randint(1, 2)):
            school, aliases = rng.choice(unis)
            add("education", person_id=pid, school=_variant(rng, school, aliases), degree=rng.choice(DEGREES),
                start_year=year, end_year=year + 4)
            year += 4
        jobs = rng.randint(1, 3)
        for j in range(jobs):
            company, aliases = rng.choice(COMPANIES)
            current = j == jobs - 1
            name = None if (pid == CRASH_PERSON and current) else _variant(rng, company, aliases)
            add("work", person_id=pid, company=name, title=rng.choice(TITLES), start_year=year,
                end_year=None if current else year + 2)
            year += 2
        for cert, issuer in rng.sample(CERTS, rng.randint(0, 2)):
            add("certifications", person_id=pid, issuer=issuer, name=cert, year=year - rng.randint(0, 5))
        for _ in range(rng.randint(0, 2)):
            company, aliases = rng.choice(COMPANIES)
            add("projects", person_id=pid, organization=_variant(rng, company, aliases),
                name=rng.choice(PROJECTS), year=year - rng.randint(0, 3))
        if rng.random() < 0.4:
            title, issuer = rng.choice(HONORS)
            add("honors", person_id=pid, issuer=issuer, title=title, year=year - 1)
        if rng.random() < 0.5:
            role, org = rng.choice(VOLUNTEER)
            add("volunteering", person_id=pid, organization=org, role=role, start_year=year - 3)
    return data


def driver_url(url: str) -> str:
    """The drivers fillgate installs: psycopg 3 and PyMySQL."""
    scheme, sep, rest = url.partition("://")
    driver = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg", "mysql": "mysql+pymysql",
              "mariadb": "mariadb+pymysql"}
    return driver.get(scheme, scheme) + sep + rest


def seed(engine: sa.Engine, n_people: int = N_PEOPLE) -> None:
    """(Re)create the example's tables and fill them with the seed."""
    metadata.drop_all(engine)
    metadata.create_all(engine)
    data = generate(n_people)
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            if data[table.name]:
                conn.execute(table.insert(), data[table.name])


# --- the enrichment logic (shared by before.py and jobs.py) ------------------------------------

_SUFFIXES = {"inc", "corp", "corporation", "ltd", "llc", "co", "the", "xyz", "ent"}


def normalize(name: str) -> str:
    """``"Acme Corp."`` and ``"ACME Corporation"`` both become ``"acme"``."""
    words = re.sub(r"[^\w]+", " ", name.casefold()).split()
    return " ".join(w for w in words if w not in _SUFFIXES)


def org_index(rows: Iterable[Mapping[str, Any]]) -> dict[str, tuple[int, str]]:
    """normalised name or alias -> (organisation id, "name" or "alias")."""
    index: dict[str, tuple[int, str]] = {}
    for row in rows:
        for alias in json.loads(row["aliases"]):
            index.setdefault(normalize(alias), (row["id"], "alias"))
    for row in rows:
        index[normalize(row["name"])] = (row["id"], "name")
    return index


def resolve(name: str | None, index: Mapping[str, tuple[int, str]]) -> tuple[int, str] | None:
    """The organisation a free-text name means, or None if it is not known. (A missing name
    crashes here: the bug of person 13's import, found by both versions.)"""
    return index.get(normalize(name))  # type: ignore[arg-type]


def profile_fields(raw_profile: str) -> dict[str, Any]:
    """full_name, bio and skills from the imported profile JSON (None where it has nothing)."""
    raw = json.loads(raw_profile)
    return {"full_name": f"{raw['first_name']} {raw['last_name']}", "bio": raw.get("summary"),
            "skills": ", ".join(sorted(raw.get("skills") or [])) or None}


def best_role(current_jobs: Sequence[Mapping[str, Any]]) -> str | None:
    """The latest-started current job (ties: the first recorded), as "Title at Company"."""
    if not current_jobs:
        return None
    job = max(current_jobs, key=lambda j: (j["start_year"] or 0, -j["id"]))
    return f"{job['title']} at {job['company_name']}"


def unlinked_sql(person: str = "p.id") -> str:
    """SQL counting a person's records that are not linked to their organisation yet."""
    parts = [
        f"(SELECT count(*) FROM {k.records} r WHERE r.person_id = {person} AND NOT EXISTS "
        f"(SELECT 1 FROM {k.link} l WHERE l.{k.record_fk} = r.id))"
        for k in LINKS.values()
    ]
    return " + ".join(parts)


CURRENT_ROLES_SQL = (
    "SELECT w.id, w.person_id, w.title, w.start_year, c.name AS company_name FROM work w "
    "JOIN work_companies l ON l.work_id = w.id JOIN companies c ON c.id = l.company_id "
    "WHERE w.end_year IS NULL AND w.person_id BETWEEN :lo AND :hi"
)

# --- looking at a database --------------------------------------------------------------------


def counts(engine: sa.Engine) -> dict[str, int]:
    """What the enrichment did so far: filled people columns and link rows."""
    with engine.connect() as conn:
        def one(sql: str) -> int:
            return int(conn.execute(sa.text(sql)).scalar_one())
        out = {
            "people": one("SELECT count(*) FROM people"),
            "full_name": one("SELECT count(*) FROM people WHERE full_name IS NOT NULL"),
            "bio": one("SELECT count(*) FROM people WHERE bio IS NOT NULL"),
            "skills": one("SELECT count(*) FROM people WHERE skills IS NOT NULL"),
            "best_current_role": one("SELECT count(*) FROM people WHERE best_current_role IS NOT NULL"),
            "complete": one("SELECT count(*) FROM people WHERE enrichment_status = 'complete'"),
        }
        out["links"] = sum(one(f"SELECT count(*) FROM {t}") for t in LINK_TABLES)
    return out


def fingerprint(engine: sa.Engine) -> str:
    """A digest of every row of the example's tables: equal digests, untouched database."""
    digest = hashlib.sha256()
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            order = [c for c in table.columns if c.name != "id" or table.name not in LINK_TABLES]
            for row in conn.execute(sa.select(*order).order_by(*order)):
                digest.update(repr((table.name, tuple(row))).encode())
    return digest.hexdigest()[:16]


def person(engine: sa.Engine, person_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(sa.select(people).where(people.c.id == person_id)).mappings().one()
        out = {k: row[k] for k in ("full_name", "best_current_role", "enrichment_status")}
        out["links"] = sum(
            int(conn.execute(sa.text(f"SELECT count(*) FROM {k.link} l JOIN {k.records} r ON r.id = l.{k.record_fk} "
                                     "WHERE r.person_id = :p"), {"p": person_id}).scalar_one())
            for k in LINKS.values()
        )
    return out
