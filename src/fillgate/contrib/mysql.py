"""Health checks only MariaDB and MySQL answer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from fillgate.errors import HealthCheckError, UsageError
from fillgate.redact import mask_secrets, redact_url
from fillgate.throttle import seconds


def replica_lag(name: str, rows: Sequence[Mapping[str, Any]]) -> tuple[float | None, str]:
    """The worst lag of one replica's replication channels (``SHOW ALL SLAVES STATUS`` rows):
    (seconds, description); None seconds when replication is stopped (pt-online-schema-change
    waits then too)."""
    if not rows:
        raise HealthCheckError(
            f"{name} is not replicating (SHOW ALL SLAVES STATUS is empty): list only replicas under replicas = [...]."
        )
    worst: tuple[float | None, str] = (0.0, name)
    for row in rows:
        channel = row.get("Connection_name") or row.get("Channel_Name") or ""
        where = f"{name}{f' channel {channel}' if channel else ''}"
        lag = row.get("Seconds_Behind_Master", row.get("Seconds_Behind_Source"))
        if lag is None:
            return None, where
        if worst[0] is not None and float(lag) > worst[0]:
            worst = (float(lag), where)
    return worst


class ReplicaLagCheck:
    """Holds while a MariaDB/MySQL replica lags more than ``max_lag_s`` seconds, or has its
    replication stopped. A primary does not know its replicas' lag: the check connects to each
    replica listed (``replicas = [...]`` under the target) and reads ``Seconds_Behind_Master``.
    The role needs the REPLICATION CLIENT (MariaDB: REPLICA MONITOR) privilege there."""

    def __init__(self, max_lag_s: float, replicas: Sequence[URL]) -> None:
        if not max_lag_s > 0:
            raise UsageError(f"ReplicaLagCheck needs max_lag_s > 0, got {max_lag_s!r}.")
        if not replicas:
            raise HealthCheckError(
                "--max-replication-lag on MariaDB/MySQL reads the lag on the replicas themselves (the primary does "
                "not know it): list them under the target in the config file, as replicas = [\"mysql://...\"]."
            )
        self.max_lag_s = float(max_lag_s)
        self.replicas = list(replicas)
        self._engines: dict[int, Engine] = {}

    def _engine(self, i: int) -> Engine:
        engine = self._engines.get(i)
        if engine is None:
            engine = self._engines[i] = create_engine(self.replicas[i], poolclass=NullPool)
        return engine

    def check(self, conn: Connection) -> str | None:
        reasons = []
        for i, url in enumerate(self.replicas):
            name = redact_url(url)
            try:
                with self._engine(i).connect() as replica:
                    statement = "SHOW ALL SLAVES STATUS" if replica.dialect.is_mariadb else "SHOW SLAVE STATUS"  # type: ignore[attr-defined]
                    rows = [dict(r) for r in replica.exec_driver_sql(statement).mappings()]
            except SQLAlchemyError as exc:
                reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
                raise HealthCheckError(f"cannot read the lag of replica {name}: {mask_secrets(reason)}") from None
            lag, where = replica_lag(name, rows)
            if lag is None:
                reasons.append(f"replication stopped on {where}")
            elif lag > self.max_lag_s:
                reasons.append(f"replication lag {seconds(lag)} > {self.max_lag_s:g}s ({where})")
        return "; ".join(reasons) or None

    def __repr__(self) -> str:
        return f"ReplicaLagCheck(max_lag_s={self.max_lag_s:g}, replicas={len(self.replicas)})"
