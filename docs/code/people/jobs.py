from fillgate import FillMissing, Job, Param


class FillEmail(Job):
    table = "people"
    key = ("id",)                        # the primary key, or a unique NOT NULL column set
    columns = {"email": FillMissing()}   # the only columns the job may write, with their policy
    source = "SELECT id, name, email FROM people WHERE created_at >= :since"
    params = {"since": Param(str, default="2020-01-01"), "domain": Param(str, default="example.com")}
    page_size = 1000                     # rows read and computed per page

    def compute(self, row, ctx):
        local = row["name"].lower().replace(" ", ".")
        return {"email": f"{local}.{row['id']}@{self.args['domain']}"}
