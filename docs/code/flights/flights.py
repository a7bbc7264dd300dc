from decimal import Decimal

from fillgate import Job, Overwrite


class FixFlights(Job):
    table = "flights"
    key = ("id",)
    columns = {"dest": Overwrite(), "amount": Overwrite(), "seats": Overwrite()}

    def compute(self, row, ctx):
        proposals = {
            1: {"dest": "JFK to IAH"},          # longer than VARCHAR(7)
            2: {"dest": "IAH"},                 # fine
            7: {"amount": Decimal("1.255")},    # a third decimal place NUMERIC(5, 2) would round
            8: {"amount": Decimal("1.25")},     # fine
            9: {"seats": "few"},                # a str for an INTEGER column
        }
        return proposals.get(row["id"])
