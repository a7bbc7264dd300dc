"""Health checks only PostgreSQL can answer."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Connection

from fillgate.errors import HealthCheckError, UsageError
from fillgate.throttle import seconds


class ReplicationLagCheck:
    """Holds while a PostgreSQL replica's replay lag exceeds ``max_lag_s`` seconds.

    Reads ``pg_stat_replication`` on the primary (the target). No replicas: healthy. A replica
    that is connected and idle has a NULL lag, which counts as 0. The role needs
    ``pg_monitor`` (or superuser) to see the lag; without it the check refuses rather than
    reporting a healthy database it cannot see.
    """

    SQL = (
        "SELECT application_name, CAST(client_addr AS text) AS client_addr, state, "
        "EXTRACT(EPOCH FROM replay_lag) AS lag_s FROM pg_stat_replication"
    )

    def __init__(self, max_lag_s: float) -> None:
        if not max_lag_s > 0:
            raise UsageError(f"ReplicationLagCheck needs max_lag_s > 0, got {max_lag_s!r}.")
        self.max_lag_s = float(max_lag_s)

    def check(self, conn: Connection) -> str | None:
        dialect = conn.dialect.name
        if dialect != "postgresql":
            raise HealthCheckError(
                f"ReplicationLagCheck reads pg_stat_replication, which only PostgreSQL has; this "
                f"target is {dialect}. Use SQLCheck with a query for your backend's replication lag."
            )
        worst: tuple[float, str] | None = None
        for row in conn.execute(text(self.SQL)).mappings():
            name = row["application_name"] or "replica"
            where = f" at {row['client_addr']}" if row["client_addr"] else ""
            if row["state"] is None:
                raise HealthCheckError(
                    "ReplicationLagCheck cannot see the replicas' lag: the database role lacks "
                    "the pg_monitor role. Run GRANT pg_monitor TO <role>, or drop the check."
                )
            lag = float(row["lag_s"] or 0.0)
            if worst is None or lag > worst[0]:
                worst = (lag, f"{name}{where}")
        if worst is None or worst[0] <= self.max_lag_s:
            return None
        return f"replication lag {seconds(worst[0])} > {self.max_lag_s:g}s ({worst[1]})"

    def __repr__(self) -> str:
        return f"ReplicationLagCheck(max_lag_s={self.max_lag_s:g})"
