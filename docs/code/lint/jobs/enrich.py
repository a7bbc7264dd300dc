import os
import sqlite3

import requests

from fillgate import FillMissing, Job


class EnrichSchools(Job):
    table = "schools"
    key = ("id",)
    columns = {"district": FillMissing()}

    def compute(self, row, ctx):
        cache = sqlite3.connect("schools.db")
        live = ctx.open_target("live")
        answer = requests.get(f"https://districts.example/{row['id']}", headers={"X-Target": "live"})
        url = os.environ["DATABASE_URL"]
        backup = "postgresql://etl:s3cret@live-db.internal/app"
        return {"district": answer.json()["district"]}
