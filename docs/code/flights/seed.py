"""Create the flights table on the database given by URL (SQLite file or PostgreSQL/MariaDB)."""

import sys

import sqlalchemy as sa

engine = sa.create_engine(sys.argv[1])
with engine.begin() as conn:
    conn.execute(sa.text("CREATE TABLE flights (id INTEGER PRIMARY KEY, dest VARCHAR(7), amount NUMERIC(5, 2), "
                         "seats INTEGER)"))
    for i in range(1, 11):
        conn.execute(sa.text("INSERT INTO flights VALUES (:i, 'SFO', 1.00, 100)"), {"i": i})
