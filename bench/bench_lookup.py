"""Benchmark: batched lookups against a local HTTP service with 20 ms latency per request.

Starts a threaded HTTP lookup server in a separate process (so it does not share the GIL
with the client), whose batch endpoint sleeps 20 ms and answers ``[{"index": i, ...}]``.
Then, for each concurrency C, resolves enough rows through :class:`fillgate.lookup.Lookup`
to make ``C * calls_per_slot`` calls, and prints the calls per second achieved against the
theoretical ``C / 20 ms`` and their ratio (target: >= 0.85), best and median of ``--repeat``
runs, next to plain threads calling the service without fillgate (what the machine allows).
Every row's result is checked to be its own.

    python bench/bench_lookup.py                    # C = 1, 4, 16; sync fn (thread pool)
    python bench/bench_lookup.py --mode async -c 1 4 16 32
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import http.client
import json
import multiprocessing
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fillgate.lookup import Lookup, LookupBatch

LATENCY_S = 0.020
TARGET_RATIO = 0.85


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection per client worker
    disable_nagle_algorithm = True  # TCP_NODELAY, as any real server: no 40 ms delayed-ACK stalls

    def do_POST(self) -> None:
        inputs = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["inputs"]
        time.sleep(LATENCY_S)
        body = json.dumps({"results": [{"index": i, "title": f"title of {x}"} for i, x in enumerate(inputs)]})
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256


def _serve(port_out: Any, ready: Any) -> None:
    server = _Server(("127.0.0.1", 0), _Handler)
    port_out.value = server.server_address[1]
    ready.set()
    server.serve_forever()


class SyncClient:
    """One keep-alive HTTP connection per worker thread."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.local = threading.local()

    def __call__(self, inputs: list[str]) -> list[dict[str, Any]]:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        body = json.dumps({"inputs": inputs})
        conn.request("POST", "/lookup", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return json.loads(response.read())["results"]


class AsyncClient:
    """A pool of keep-alive connections over asyncio streams (plain HTTP/1.1)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.pool: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def __call__(self, inputs: list[str]) -> list[dict[str, Any]]:
        if self.pool:
            reader, writer = self.pool.pop()
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        body = json.dumps({"inputs": inputs}).encode()
        writer.write(
            b"POST /lookup HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        await writer.drain()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        payload = await reader.readexactly(length)
        self.pool.append((reader, writer))
        return json.loads(payload)["results"]

    def close(self) -> None:
        for _, writer in self.pool:
            writer.close()
        self.pool.clear()


def baseline(port: int, concurrency: int, batch_size: int, calls_per_slot: int) -> float:
    """Calls per second of plain threads calling the service directly (no fillgate): what
    this machine allows, to tell fillgate's overhead from the machine's."""
    calls = concurrency * calls_per_slot
    client = SyncClient(port)
    inputs = [f"album-{i}" for i in range(batch_size)]
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: client(inputs), range(concurrency)))  # warm up
        started = time.perf_counter()
        list(pool.map(lambda _: client(inputs), range(calls)))
        return calls / (time.perf_counter() - started)


def run(port: int, concurrency: int, mode: str, batch_size: int, calls_per_slot: int) -> dict[str, Any]:
    calls = concurrency * calls_per_slot
    rows = [{"id": i, "album": f"album-{i}"} for i in range(calls * batch_size)]
    warm_up = rows[: batch_size * concurrency]  # connections and threads
    with Lookup(SyncClient(port) if mode == "sync" else AsyncClient(port), input=lambda r: r["album"],
                batch_size=batch_size, concurrency=concurrency, timeout=5, retries=0) as lookup:
        if mode == "sync":
            lookup.resolve(warm_up)
            started = time.perf_counter()
            batch = lookup.resolve(rows)
            elapsed = time.perf_counter() - started
        else:
            async def measure() -> tuple[LookupBatch, float]:
                await lookup.aresolve(warm_up)
                started = time.perf_counter()
                batch = await lookup.aresolve(rows)
                elapsed = time.perf_counter() - started
                lookup.fn.close()  # type: ignore[union-attr]
                return batch, elapsed

            batch, elapsed = asyncio.run(measure())
    wrong = sum(
        1 for row, o in zip(rows, batch.outcomes, strict=True)
        if not o.ok or o.value["title"] != f"title of {row['album']}"
    )
    achieved = batch.calls / elapsed
    theoretical = concurrency / LATENCY_S
    return {
        "C": concurrency, "calls": batch.calls, "rows": len(rows), "seconds": elapsed,
        "calls_per_s": achieved, "theoretical": theoretical, "ratio": achieved / theoretical,
        "rows_per_s": len(rows) / elapsed, "not_ok": wrong, "unexpected_index": batch.unexpected_index,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--mode", choices=["sync", "async"], default="sync")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--calls-per-slot", type=int, default=50, help="calls made = C * this")
    parser.add_argument("--repeat", type=int, default=3, help="runs per concurrency; the best is reported")
    args = parser.parse_args(argv)

    port = multiprocessing.Value("i", 0)
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=_serve, args=(port, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(10):
            print("the lookup server did not start", file=sys.stderr)
            return 2
        print(f"lookup server: 127.0.0.1:{port.value}, {LATENCY_S * 1000:.0f} ms per request; "
              f"client: {args.mode} fn, batch_size={args.batch_size}")
        print(f"best of {args.repeat} runs per C; 'raw' = plain threads calling the service without fillgate, "
              "i.e. what this machine allows")
        print(f"{'C':>4} {'calls':>6} {'rows':>7} {'secs':>6} {'calls/s':>9} {'C/20ms':>8} {'ratio':>6} "
              f"{'median':>6} {'rows/s':>8} {'wrong':>5} {'raw calls/s':>12} {'vs raw':>7}")
        failed = False
        for c in args.concurrency:
            runs = [run(port.value, c, args.mode, args.batch_size, args.calls_per_slot) for _ in range(args.repeat)]
            raw = max(baseline(port.value, c, args.batch_size, args.calls_per_slot) for _ in range(args.repeat))
            r = max(runs, key=lambda x: x["ratio"])
            median = statistics.median(x["ratio"] for x in runs)
            wrong = sum(x["not_ok"] for x in runs)
            ok = r["ratio"] >= TARGET_RATIO and wrong == 0
            failed |= not ok
            print(f"{r['C']:>4} {r['calls']:>6} {r['rows']:>7} {r['seconds']:>6.2f} {r['calls_per_s']:>9.1f} "
                  f"{r['theoretical']:>8.1f} {r['ratio']:>6.3f} {median:>6.3f} {r['rows_per_s']:>8.0f} {wrong:>5} "
                  f"{raw:>12.1f} {r['calls_per_s'] / raw:>7.3f}  {'ok' if ok else 'BELOW TARGET'}")
        print(f"target: ratio >= {TARGET_RATIO} and 0 wrong rows: {'met' if not failed else 'NOT met'}")
        return 1 if failed else 0
    finally:
        server.terminate()
        server.join(5)


if __name__ == "__main__":
    sys.exit(main())
