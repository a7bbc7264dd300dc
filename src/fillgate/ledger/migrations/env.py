"""Alembic environment for fillgate's own ledger tables.

fillgate runs these migrations itself (``fillgate init``) on the connection it was given,
with its own version table, so they never mix with an application's Alembic history.
"""

from alembic import context

from fillgate.ledger.schema import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(connection=connection, version_table=VERSION_TABLE, target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
