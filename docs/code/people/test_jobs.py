"""Testing a job: plan it against a small copy of the table, and check the plan, not the database."""

import sqlite3

from fillgate import connect, init_target, load_config, make_plan

from jobs import FillEmail


def test_fill_email_plans_only_missing_addresses(tmp_path):
    path = tmp_path / "people.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT, created_at TEXT)")
    db.executemany("INSERT INTO people VALUES (?, ?, ?, ?)", [
        (1, "Ada Lovelace", None, "2021-01-01"),          # missing: filled
        (2, "Alan Turing", "alan@bletchley.example", "2021-01-01"),  # known: skipped by FillMissing
        (3, "Grace Hopper", None, "2019-01-01"),          # before --param since: not read
    ])
    db.commit()
    (tmp_path / "fillgate.toml").write_text(f'[targets.test]\nurl = "sqlite:///{path}"\n')
    target = load_config(tmp_path / "fillgate.toml").target("test")
    init_target(target)

    plan = make_plan(connect(target), FillEmail, {"domain": "corp.example"})

    assert plan.counts["rows"] == 2
    assert plan.counts["writes"] == 1
    assert plan.counts["skipped"] == 1
    assert plan.samples["change"] == [
        {"key": [1], "column": "email", "old": None, "new": "ada.lovelace.1@corp.example"}
    ]
    # planning wrote nothing to the table
    assert db.execute("SELECT email FROM people WHERE id = 1").fetchone() == (None,)
