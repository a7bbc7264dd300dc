"""fillgate's own tables in the target database: schema, migrations, queries and locks."""

from fillgate.ledger.locks import ApplyLock
from fillgate.ledger.store import Ledger, Run, acting_as, error_row, new_run_id, operator_name, utcnow

__all__ = ["ApplyLock", "Ledger", "Run", "acting_as", "error_row", "new_run_id", "operator_name", "utcnow"]
