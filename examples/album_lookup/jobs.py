"""Example 4, WITH fillgate: the album-metadata backfill as a job with a batched lookup.

The job asks the bulk lookup service for the metadata of one page of albums at a time and
declares that lookup to fillgate (``build_lookup``). fillgate checks, before ``compute`` ever
sees a result, that the result at position i of the service's answer carries ``index == i``
and that no other result claims index i (O(1) per row, no search). A result that is missing,
out of place or duplicated is never handed to ``compute``, so it can never be written: the row
is counted as ``unexpected_index`` (plan counts, plan file, ``fillgate show``, events), the
rest of the page carries on, and the page raises ONE alert with a stable fingerprint.

    fillgate run examples/album_lookup/jobs.py:FillAlbumMetadata --param service_url=http://127.0.0.1:8765

The lookup's batch size equals the page size, so one page is one service call is one alert.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from fillgate import FillMissing, Job, Lookup, Param, RunContext

COLUMNS = ("genre", "release_year", "label", "catalog_no")
PAGE = 50


class AlbumService:
    """The lookup function: ``list[album id] -> list[result]``, one POST per call."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/") + "/lookup"
        self.timeout = timeout

    def __call__(self, ids: list[int]) -> list[dict[str, Any]]:
        request = urllib.request.Request(
            self.url, data=json.dumps({"ids": ids}).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.load(response)["results"]


class FillAlbumMetadata(Job):
    """Fill each album's missing genre, release year, label and catalog number."""

    name = "album_lookup:FillAlbumMetadata"  # stable: alert fingerprints hash the job's name
    table = "albums"
    key = ("id",)
    columns = {column: FillMissing() for column in COLUMNS}
    source = "SELECT id, title, genre, release_year, label, catalog_no FROM albums"
    params = {"service_url": Param(str, help="base URL of the bulk album-lookup service")}
    page_size = PAGE

    def build_lookup(self, ctx: RunContext) -> Lookup:
        return Lookup(
            AlbumService(self.args["service_url"]),
            input=lambda row: row["id"],
            batch_size=PAGE,  # one call per page
            concurrency=1,
            timeout=10,
            retries=2,
            transient=(TimeoutError, ConnectionError, urllib.error.URLError),
            name="album-service",
            # match_by=None: results align by position, result["index"] == i
        )

    def compute(self, row: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
        meta = ctx.result  # this row's own result: fillgate checked its index
        return {column: meta.get(column) for column in COLUMNS}
