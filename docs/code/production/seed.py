"""Create staging.db and live.db: the same agent registry (examples/stale_classifications) in each."""

import sys

import sqlalchemy as sa
import stale_agents

for name in sys.argv[1:]:
    stale_agents.seed(sa.create_engine(f"sqlite:///{name}"), "http://127.0.0.1:9")
    if name == "live.db":  # live has drifted a little since staging was copied: two more types were lost
        with sa.create_engine(f"sqlite:///{name}").begin() as conn:
            conn.execute(sa.text("UPDATE agents SET agent_type = NULL WHERE id IN (2, 6)"))
