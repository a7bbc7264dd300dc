"""Create albums.db: 300 albums without a title, and a control_flag table for --hold-while."""

import sqlite3
import sys

db = sqlite3.connect(sys.argv[1] if len(sys.argv) > 1 else "albums.db")
db.executescript(
    """
    CREATE TABLE albums (id INTEGER PRIMARY KEY, title TEXT);
    CREATE TABLE control_flag (hold INTEGER NOT NULL);
    INSERT INTO control_flag VALUES (0);
    """
)
db.executemany("INSERT INTO albums VALUES (?, NULL)", [(i,) for i in range(1, 301)])
db.commit()
