"""Create people.db: 1,000 people, every third one without an email (the docs' sample database)."""

import random
import sqlite3
import sys

rng = random.Random(1)
names = ["Ada Lovelace", "Grace Hopper", "Alan Turing", "Barbara Liskov", "Edsger Dijkstra", "Radia Perlman"]
db = sqlite3.connect(sys.argv[1] if len(sys.argv) > 1 else "people.db")
db.executescript(
    """
    CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT, created_at TEXT NOT NULL);
    CREATE TABLE visits (id INTEGER NOT NULL, day TEXT NOT NULL, note TEXT, seen_at TEXT,
                         PRIMARY KEY (id, day));
    """
)
db.executemany(
    "INSERT INTO people VALUES (?, ?, ?, ?)",
    [(i, rng.choice(names), None if i % 3 == 0 else f"person{i}@corp.example", f"{2018 + i % 7}-06-01")
     for i in range(1, 1001)],
)
db.executemany("INSERT INTO visits VALUES (?, ?, NULL, NULL)", [(1, "2024-01-01"), (1, "2024-01-02"), (2, "2024-01-01")])
db.commit()
