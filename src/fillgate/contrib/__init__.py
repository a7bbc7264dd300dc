"""Optional integrations: alert sinks (a webhook, Sentry) and health checks that only one
database has (PostgreSQL's replication lag). Each module imports its third-party package only
when used, and says which extra to install when it is missing."""
