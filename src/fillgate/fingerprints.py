"""Fingerprints: stable names for "the same problem", across runs, processes and deploys.

One scheme for all: the first 32 hex digits of SHA-256 over ``fillgate|`` and the parts joined
by ``|``. An error's fingerprint names its job, its exception type and the function that raised
it (never the message, which holds row data); an anomaly's names the job and the anomaly kind
(alerts group by it, in Sentry too); a conflict's names the job and the column.
"""

from __future__ import annotations

import hashlib
import os
import traceback


def fingerprint(*parts: str) -> str:
    return hashlib.sha256("|".join(("fillgate", *parts)).encode()).hexdigest()[:32]


def error_fingerprint(job: str, exc: BaseException) -> str:
    """The job, the error's type and where it was raised (file and function)."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].name}" if frames else ""
    return fingerprint(job, "error", f"{type(exc).__module__}.{type(exc).__qualname__}", where)


def anomaly_fingerprint(job: str, kind: str) -> str:
    """The job and the anomaly kind (``unexpected_index``, ``errors``, ``run_failed``, ...)."""
    return fingerprint(job, kind)


def conflict_fingerprint(job: str, column: str) -> str:
    return fingerprint(job, "conflict", column)
