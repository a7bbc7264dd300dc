"""Example 3's world: articles, the per-run topic digests, and the digest logic shared by
the "before" script (``before.py``) and the fillgate jobs (``jobs.py``).

* ``articles(id, topic, title, published_at)``: the input.
* ``digests(id, run_timestamp, topic, articles, headline)``: one row per run and topic,
  ``UNIQUE (run_timestamp, topic)``. ``run_timestamp`` identifies the run that wrote the row:
  the before script puts a minute-precision timestamp there; fillgate puts the run's ULID (it
  sorts by time like a timestamp, and carries 80 random bits, so two runs never share one).
"""

from __future__ import annotations

import sqlalchemy as sa

TOPICS = ["databases", "python", "rust", "security", "distributed-systems", "compilers"]

metadata = sa.MetaData()

articles = sa.Table(
    "articles", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("topic", sa.String(64), nullable=False),
    sa.Column("title", sa.String(200), nullable=False),
    sa.Column("published_at", sa.String(32), nullable=False),
)
digests = sa.Table(
    "digests", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_timestamp", sa.String(40), nullable=False),
    sa.Column("topic", sa.String(64), nullable=False),
    sa.Column("articles", sa.Integer, nullable=False),
    sa.Column("headline", sa.String(300), nullable=False),
    sa.UniqueConstraint("run_timestamp", "topic", name="uq_digests_run_topic"),
)

# The digest of every topic: how many articles, and the latest one's title.
DIGEST_SOURCE = (
    "SELECT a.topic, count(*) AS articles, "
    "(SELECT l.title FROM articles l WHERE l.topic = a.topic ORDER BY l.published_at DESC, l.id DESC LIMIT 1) "
    "AS latest FROM articles a GROUP BY a.topic"
)


def driver_url(url: str) -> str:
    """The drivers fillgate installs: psycopg 3 and PyMySQL."""
    scheme, sep, rest = url.partition("://")
    driver = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg", "mysql": "mysql+pymysql",
              "mariadb": "mariadb+pymysql"}
    return driver.get(scheme, scheme) + sep + rest


def seed(engine: sa.Engine, per_topic: int = 5) -> None:
    """(Re)create ``articles`` and ``digests``; ``per_topic`` articles for every topic."""
    metadata.drop_all(engine)
    metadata.create_all(engine)
    add_articles(engine, per_topic, hour=5)


def add_articles(engine: sa.Engine, per_topic: int, hour: int) -> None:
    """New articles for every topic, published at ``hour`` (the news between two runs)."""
    with engine.begin() as conn:
        first = int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(articles.c.id), 0))).scalar_one()) + 1
        rows = []
        for t, topic in enumerate(TOPICS):
            for n in range(per_topic):
                rows.append({"id": first + len(rows), "topic": topic,
                             "title": f"{topic} news #{hour:02d}-{n + 1}",
                             "published_at": f"2024-05-01T{hour:02d}:{t * 5 + n:02d}"})
        conn.execute(articles.insert(), rows)


def headline(count: int, latest: str) -> str:
    return f"{count} articles; latest: {latest}"


def digest_rows(engine: sa.Engine) -> list[tuple[str, str, int]]:
    """(run_timestamp, topic, articles) of every digest, in order."""
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(  # type: ignore[misc]
            sa.select(digests.c.run_timestamp, digests.c.topic, digests.c.articles)
            .order_by(digests.c.run_timestamp, digests.c.topic))]
