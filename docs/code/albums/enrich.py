import json
import urllib.error
import urllib.request

from fillgate import FillMissing, Job, Lookup, Param


def album_service(url):
    def fetch(ids):  # one HTTP call for a batch of album ids
        body = json.dumps({"ids": ids}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)["results"]  # [{"index": 0, "id": 17, "title": ...}, ...]
    return fetch


class FillAlbumTitle(Job):
    table = "albums"
    key = ("id",)
    columns = {"title": FillMissing()}
    source = "SELECT id, title FROM albums"
    params = {"service": Param(str, default="http://127.0.0.1:8765/lookup")}
    page_size = 100

    def build_lookup(self, ctx):
        return Lookup(
            album_service(self.args["service"]),
            input=lambda row: row["id"],   # what the service gets for each row
            batch_size=50,                 # ids per call
            concurrency=4,                 # calls in flight at most
            rate=20,                       # calls started per second at most
            timeout=5,                     # seconds per call attempt
            retries=3,                     # further attempts after a transient error
            transient=(TimeoutError, urllib.error.URLError),  # network and HTTP errors are retried
        )

    def compute(self, row, ctx):
        return {"title": ctx.result["title"]}   # ctx.result: this row's own result, checked
