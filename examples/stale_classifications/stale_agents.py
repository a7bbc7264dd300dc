"""Example 2's world: a registry of member profiles with agents, the type classifier, the
agents' probe endpoint (a local HTTP server), and the seed data.

Shared by the "before" scripts (``before.py``), the fillgate jobs (``jobs.py``), the demo
(``demo.py``) and the tests. The classifier and the probe are the same in the "before" and the
fillgate version: the incident was never in them, it was in how their answers were written.

The seed (300 agents of 75 members) is deterministic. Exactly two agents are mis-typed, since
before the classifier existed (the old registration form defaulted to 'sales'):

* agent 17 is stored as 'sales', but its capability snapshot (and its probe) say 'buying';
* agent 83 is stored as 'buying', but its snapshot (and its probe) say 'sales'.

Besides those, 12 agents have no type (NULL), 8 are 'unknown', and 4 have a snapshot from
which no type can be inferred. The probe server answers every agent with its true type,
except: agents 64, 174 and 268 time out, agent 119's host does not resolve, agent 205 answers
HTTP 503, agent 96 answers the wrong type (a flaky probe), and agents 88, 156 and 233 are
slow but within the timeout.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa

# --- the classifier ----------------------------------------------------------------------

BUYING_SKILLS = ("rfq.create", "rfq.compare", "po.submit", "po.track", "supplier.search", "spend.report",
                 "invoice.receive")
SALES_SKILLS = ("quote.issue", "catalog.publish", "order.accept", "order.confirm", "lead.qualify",
                "invoice.issue", "pricing.update")
NEUTRAL_SKILLS = ("profile.read", "webhook.subscribe", "message.send", "calendar.book")
AGENT_TYPES = ("buying", "sales", "unknown")


def infer_type(capabilities: str) -> str:
    """The agent type its capability snapshot implies: 'buying', 'sales' or 'unknown'
    (no skills of either side, or as many of one as of the other)."""
    skills = set(json.loads(capabilities).get("skills", []))
    buying = len(skills & set(BUYING_SKILLS))
    sales = len(skills & set(SALES_SKILLS))
    if buying > sales:
        return "buying"
    if sales > buying:
        return "sales"
    return "unknown"


def name_rule_type(name: str) -> str:
    """A quick keyword rule on the agent's name (someone's shortcut, not the classifier):
    'buying' if the name says buy/purchase/procure, else 'sales'. It is wrong for most
    sourcing, supplier, tender and spend agents."""
    low = name.lower()
    return "buying" if any(word in low for word in ("buy", "purchas", "procure")) else "sales"


# --- the probe client ---------------------------------------------------------------------


class ProbeFailed(Exception):
    """The agent's probe endpoint gave no answer: timeout, DNS failure, HTTP error."""


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy


def probe_agent(url: str, timeout: float) -> dict[str, Any]:
    """GET the agent's probe endpoint; its JSON answer, or :class:`ProbeFailed`."""
    try:
        with _opener.open(url, timeout=timeout) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        raise ProbeFailed(f"HTTP {exc.code}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise ProbeFailed(f"timed out after {timeout * 1000:.0f} ms") from None
        if isinstance(exc.reason, socket.gaierror):
            raise ProbeFailed(f"DNS failed: {urlsplit(url).hostname}") from None
        raise ProbeFailed(str(exc.reason)) from None
    except TimeoutError:
        raise ProbeFailed(f"timed out after {timeout * 1000:.0f} ms") from None
    except (OSError, ValueError) as exc:
        raise ProbeFailed(f"{type(exc).__name__}: {exc}") from None


# --- the seed -------------------------------------------------------------------------------

N_MEMBERS = 75
N_AGENTS = 300
MISTYPED = {17: ("sales", "buying"), 83: ("buying", "sales")}  # id: (stored, true type)
NULL_IDS = (3, 8, 11, 19, 23, 27, 31, 36, 40, 47, 52, 58)
UNKNOWN_IDS = (5, 14, 29, 38, 66, 71, 90, 97)
AMBIGUOUS = {122: "buying", 131: "sales", 250: "unknown", 287: "buying"}  # snapshot implies no type
TIMEOUT_IDS = (64, 174, 268)
DNS_ID = 119
HTTP_ERROR_ID = 205
FLAKY_ID = 96
SLOW = {88: 0.10, 156: 0.07, 233: 0.05}  # seconds: slow, but within the default timeout
TIMEOUT_DELAY = 2.0  # how long a timing-out agent takes to answer

BUYING_ROLES = ("Procurement Agent", "Purchasing Bot", "Sourcing Assistant", "Supplier Scout",
                "Tender Watcher", "Spend Analyst")
SALES_ROLES = ("Sales Agent", "Quote Desk", "Order Assistant", "Catalog Publisher", "Lead Qualifier",
               "Account Rep")
COMPANY = ("Nordlicht", "Hartmann", "Bluefin", "Kestrel", "Alder", "Meridian", "Solvang", "Corvid",
           "Tamarack", "Brightwater", "Ostara", "Juniper", "Calder", "Fenwick", "Larkspur")
TRADE = ("Foods", "Logistics", "Textiles", "Components", "Pharma", "Timber", "Marine", "Tools")
LEGAL = ("GmbH", "Ltd", "B.V.", "AB", "S.A.", "Inc.")
COUNTRIES = ("DE", "GB", "NL", "SE", "ES", "US", "FR", "PL")


@dataclass(frozen=True)
class Agent:
    id: int
    member_id: int
    name: str
    agent_type: str | None  # as stored
    true_type: str  # what the agent really is (the probe's answer)
    capabilities: str
    registered_on: str


def _snapshot(rng: random.Random, kind: str, day: str) -> str:
    if kind == "buying":
        skills = rng.sample(BUYING_SKILLS, rng.randint(2, 4)) + rng.sample(SALES_SKILLS, rng.randint(0, 1))
    elif kind == "sales":
        skills = rng.sample(SALES_SKILLS, rng.randint(2, 4)) + rng.sample(BUYING_SKILLS, rng.randint(0, 1))
    elif kind == "balanced":
        skills = [rng.choice(BUYING_SKILLS), rng.choice(SALES_SKILLS)]
    else:  # a sparse snapshot: nothing that says which side the agent is on
        skills = []
    skills += rng.sample(NEUTRAL_SKILLS, rng.randint(0, 2))
    rng.shuffle(skills)
    return json.dumps({"snapshot_at": day + "T06:00:00Z", "protocol": "agent-card/0.3", "skills": skills,
                       "regions": sorted(rng.sample(("EU", "UK", "NA", "APAC"), rng.randint(1, 2)))})


def generate(seed: int = 2) -> tuple[list[dict[str, Any]], list[Agent]]:
    """The members and agents of the registry (deterministic)."""
    rng = random.Random(seed)
    names = rng.sample([f"{c} {t} {lg}" for c in COMPANY for t in TRADE for lg in LEGAL], N_MEMBERS)
    members = [{"id": i, "name": names[i - 1], "country": rng.choice(COUNTRIES),
                "joined_on": f"{2018 + i * 6 // N_MEMBERS}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"}
               for i in range(1, N_MEMBERS + 1)]
    agents = []
    for i in range(1, N_AGENTS + 1):
        member = members[(i - 1) // 4]
        # ids follow registration order: 2019-01 .. 2024-12; the classifier arrived in 2021
        month = (i - 1) * 72 // N_AGENTS
        day = f"{2019 + month // 12}-{month % 12 + 1:02d}-{rng.randint(1, 28):02d}"
        if i in AMBIGUOUS:
            true_type = AMBIGUOUS[i]
            snapshot = _snapshot(rng, "balanced" if true_type == "unknown" else "sparse", day)
        else:
            true_type = MISTYPED[i][1] if i in MISTYPED else rng.choice(("buying", "sales"))
            snapshot = _snapshot(rng, true_type, day)
        role = rng.choice(BUYING_ROLES if true_type == "buying" else SALES_ROLES if true_type == "sales"
                          else ("Integration Hub",))
        if i in AMBIGUOUS and true_type != "unknown":
            role = "Integration Hub"
        stored: str | None = true_type
        if i in MISTYPED:
            stored = MISTYPED[i][0]
        elif i in NULL_IDS:
            stored = None
        elif i in UNKNOWN_IDS:
            stored = "unknown"
        company = member["name"].split()[0]
        agents.append(Agent(i, member["id"], f"{company} {role}", stored, true_type, snapshot, day))
    return members, agents


def probe_url(agent_id: int, probe_base: str) -> str:
    if agent_id == DNS_ID:
        return f"http://agent-{agent_id}.invalid/agents/{agent_id}"  # .invalid never resolves
    return f"{probe_base}/agents/{agent_id}"


SCHEMA = (
    "CREATE TABLE members (id INTEGER NOT NULL PRIMARY KEY, name VARCHAR(120) NOT NULL, "
    "country CHAR(2) NOT NULL, joined_on DATE NOT NULL)",
    "CREATE TABLE agents (id INTEGER NOT NULL PRIMARY KEY, member_id INTEGER NOT NULL, "
    "name VARCHAR(120) NOT NULL, agent_type VARCHAR(10) NULL, capabilities TEXT NOT NULL, "
    "probe_url VARCHAR(200) NOT NULL, registered_on DATE NOT NULL, "
    "CONSTRAINT agents_type_check CHECK (agent_type IN ('buying', 'sales', 'unknown')), "
    "CONSTRAINT agents_member_fk FOREIGN KEY (member_id) REFERENCES members (id))",
)


def seed(engine: sa.Engine, probe_base: str) -> list[Agent]:
    """(Re)create ``members`` and ``agents`` and fill them; other tables are left alone."""
    members, agents = generate()
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS agents"))
        conn.execute(sa.text("DROP TABLE IF EXISTS members"))
        for ddl in SCHEMA:
            conn.execute(sa.text(ddl))
        conn.execute(sa.text("INSERT INTO members (id, name, country, joined_on) "
                             "VALUES (:id, :name, :country, :joined_on)"), members)
        conn.execute(
            sa.text("INSERT INTO agents (id, member_id, name, agent_type, capabilities, probe_url, registered_on) "
                    "VALUES (:id, :member_id, :name, :agent_type, :capabilities, :probe_url, :registered_on)"),
            [{"id": a.id, "member_id": a.member_id, "name": a.name, "agent_type": a.agent_type,
              "capabilities": a.capabilities, "probe_url": probe_url(a.id, probe_base),
              "registered_on": a.registered_on} for a in agents],
        )
    return agents


def agent_types(engine: sa.Engine) -> dict[int, str | None]:
    """``{agent id: stored agent_type}``."""
    with engine.connect() as conn:
        return {int(r[0]): r[1] for r in conn.execute(sa.text("SELECT id, agent_type FROM agents ORDER BY id"))}


# --- the probe server -----------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    agent_type: str | None
    delay: float = 0.0
    status: int = 200


def probe_answers(agents: list[Agent] | None = None) -> dict[int, Answer]:
    """What each agent's probe endpoint answers (see the module docstring)."""
    agents = agents if agents is not None else generate()[1]
    out: dict[int, Answer] = {}
    for a in agents:
        answer = Answer(a.true_type, delay=SLOW.get(a.id, 0.0))
        if a.id in TIMEOUT_IDS:
            answer = Answer(a.true_type, delay=TIMEOUT_DELAY)
        elif a.id == HTTP_ERROR_ID:
            answer = Answer(None, status=503)
        elif a.id == FLAKY_ID:
            answer = Answer("sales" if a.true_type == "buying" else "buying")
        out[a.id] = answer
    return out


class _Handler(BaseHTTPRequestHandler):
    server: _ProbeHTTPServer

    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")
        answer = None
        if len(parts) == 2 and parts[0] == "agents" and parts[1].isdigit():
            answer = self.server.answers.get(int(parts[1]))
        if answer is None:
            self._send(404, {"error": "no such agent"})
            return
        if answer.delay and self.server.stopping.wait(answer.delay):
            return
        if answer.status != 200:
            self._send(answer.status, {"error": "agent unavailable"})
            return
        self.server.hits += 1
        self._send(200, {"agent_id": int(parts[1]), "agent_type": answer.agent_type,
                         "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def _send(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (a timed-out probe)
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ProbeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, answers: dict[int, Answer]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answers = answers
        self.stopping = threading.Event()
        self.hits = 0

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out and closed its socket is expected here


@contextmanager
def probe_server(answers: dict[int, Answer] | None = None) -> Iterator[str]:
    """Serve the agents' probe endpoints on a free localhost port; yields the base URL."""
    server = _ProbeHTTPServer(answers if answers is not None else probe_answers())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
