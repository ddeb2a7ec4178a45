"""`sleigh serve` benchmarks: throughput and latency under concurrent clients, the time the server adds
to the first token over `Pipeline`, and memory over many sequential requests.

    # requests/s and latency p50/p90/p99 at 1, 4 and 16 clients, for 1 replica (uvicorn) and 2 (Ray Serve)
    python benchmarks/serve_bench.py throughput --package runs/small-pkg --replicas 1,2 --concurrency 1,4,16
    # the server's added time to first token over Pipeline (streamed, same prompt, same threads, alternated)
    python benchmarks/serve_bench.py ttft --package runs/tiny-pkg --repeats 50
    # ... and in the same rounds a server run from another source tree (git worktree add ../old <commit>)
    python benchmarks/serve_bench.py ttft --package runs/tiny-pkg --repeats 50 --compare-source ../old
    # 1,000 sequential requests: the server's resident memory along the way
    python benchmarks/serve_bench.py soak --package runs/tiny-pkg --requests 1000

Each prints a table and, with --out, writes the figures as JSON. The servers run as `sleigh serve`
subprocesses on 127.0.0.1 (Ray: `--ray --replicas N`, a local cluster started and stopped here).
Every request is the same (greedy, `ignore_eos`, fixed max_tokens), so all generate equal lengths.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = ROOT / "examples" / "chelsea.jpg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`sleigh serve` in a subprocess, healthy on return; stopped with SIGINT (Ray shuts down cleanly)."""

    def __init__(self, package: Path, threads: int, replicas: int = 1, max_queue: int = 256,
                 source: Path | None = None):
        """`source`: run the sleigh found in this folder (say, a checkout of an older commit) instead."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "sleigh.cli", "serve", "--model", str(package.resolve()), "--port", str(self.port),
               "--threads", str(threads), "--max-queue", str(max_queue), "--log-level", "warning"]
        if replicas > 1:
            cmd += ["--ray", "--replicas", str(replicas), "--replica-cpus", str(threads)]
        env = None if source is None else {**os.environ, "PYTHONPATH": str(source.resolve())}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=source)  # `python -m` puts the working folder first on the path
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"sleigh serve exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    self.model = httpx.get(self.base + "/v1/models", timeout=5).json()["data"][0]["id"]
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit("sleigh serve did not become healthy in 300 s")

    def rss_mb(self) -> float:
        """The resident memory of the serving process (uvicorn mode)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def request_body(model: str, prompt: str, image: Path | None, max_tokens: int, stream: bool = False) -> dict:
    content: list[dict] = [{"type": "text", "text": prompt}]
    if image is not None:
        mime = "image/png" if image.suffix.lower() == ".png" else "image/jpeg"
        url = f"data:{mime};base64," + base64.b64encode(image.read_bytes()).decode()
        content.append({"type": "image_url", "image_url": {"url": url}})
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


# -- throughput -------------------------------------------------------------------------------------

def load_level(server: ServerProcess, body: dict, clients: int, requests: int) -> dict:
    """`requests` requests from `clients` threads; each answer checked (200, the expected length)."""
    latencies: list[float] = []
    ids: set[str] = set()

    def one(_):
        with httpx.Client(timeout=600) as c:
            t = time.perf_counter()
            r = c.post(server.base + "/v1/chat/completions", json=body)
            dt = time.perf_counter() - t
        r.raise_for_status()
        data = r.json()
        assert data["usage"]["completion_tokens"] == body["max_tokens"], data["usage"]
        return dt, data["id"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for dt, rid in pool.map(one, range(requests)):
            latencies.append(dt)
            ids.add(rid)
    wall = time.perf_counter() - t0
    assert len(ids) == requests, "a request was lost or answered twice"
    return {"clients": clients, "requests": requests, "requests_per_s": requests / wall,
            "p50_s": percentile(latencies, 0.5), "p90_s": percentile(latencies, 0.9),
            "p99_s": percentile(latencies, 0.99)}


def cmd_throughput(args) -> dict:
    rows = []
    image = None if args.no_image else args.image
    for replicas in args.replicas:
        server = ServerProcess(args.package, args.threads, replicas)
        try:
            body = request_body(server.model, args.prompt, image, args.max_tokens)
            load_level(server, body, 1, 1)  # warm-up: sessions, arenas
            for clients in args.concurrency:
                row = {"replicas": replicas, **load_level(server, body, clients, max(args.requests, clients))}
                rows.append(row)
                print(f"replicas {replicas}  clients {clients:>3}  {row['requests_per_s']:7.2f} req/s  "
                      f"p50 {row['p50_s']:.3f} s  p90 {row['p90_s']:.3f} s  p99 {row['p99_s']:.3f} s", flush=True)
        finally:
            server.stop()
    return {"rows": rows}


# -- time to first token ----------------------------------------------------------------------------

def is_first_content(line: str) -> bool:
    """An SSE line carrying answer text (not the opening role chunk's empty content)."""
    return '"content": "' in line and '"content": ""' not in line


class RawSSEClient:
    """The leanest client: one kept-alive `http.client` connection and a body encoded once, so the
    figure is the server's time and not a client library's (httpx's own parsing is measured apart)."""

    def __init__(self, server: ServerProcess, body: dict):
        import http.client

        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
        self.body = json.dumps(body).encode()

    def first_token_s(self) -> float:
        t = time.perf_counter()
        first = None
        self.conn.request("POST", "/v1/chat/completions", body=self.body, headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        assert response.status == 200, response.read()
        for line in response:  # read to the end: the next request finds the model free
            if first is None and is_first_content(line.decode()):
                first = time.perf_counter() - t
        return first


class HttpxSSEClient:
    def __init__(self, server: ServerProcess, body: dict):
        self.client, self.url, self.body = httpx.Client(timeout=600), server.base + "/v1/chat/completions", body

    def first_token_s(self) -> float:
        t = time.perf_counter()
        first = None
        with self.client.stream("POST", self.url, json=self.body) as r:
            for line in r.iter_lines():
                if first is None and is_first_content(line):
                    first = time.perf_counter() - t
        return first


def cmd_ttft(args) -> dict:
    """Pipeline and server alternated request by request (Pipeline, raw client, httpx client, in an
    order that rotates each round), so all see the same load on a shared machine; medians after one
    warm-up round."""
    from sleigh.runtime.pipeline import Pipeline
    from sleigh.runtime.sampling import SamplingOptions

    image = None if args.no_image else args.image
    pipe = Pipeline.load(args.package, threads=args.threads)

    def pipeline_first_token_s() -> float:
        t = time.perf_counter()
        gen = pipe.generate(image, args.prompt, max_new_tokens=2, sampling=SamplingOptions(), ignore_eos=True)
        next(iter(gen))
        first = time.perf_counter() - t
        for _ in gen:
            pass
        return first

    servers = [ServerProcess(args.package, args.threads)]
    try:
        if args.compare_source:
            servers.append(ServerProcess(args.package, args.threads, source=args.compare_source))
        body = request_body(servers[0].model, args.prompt, image, 2, stream=True)
        sides = {"pipeline": pipeline_first_token_s, "server": RawSSEClient(servers[0], body).first_token_s,
                 "server_httpx": HttpxSSEClient(servers[0], body).first_token_s}
        if args.compare_source:
            sides["compared_server"] = RawSSEClient(servers[1], body).first_token_s
        times: dict[str, list[float]] = {name: [] for name in sides}
        order = list(sides)
        for i in range(args.repeats + 1):
            for name in order[i % len(order):] + order[:i % len(order)]:  # each side first in turn
                times[name].append(sides[name]())
    finally:
        for server in servers:
            server.stop()
    ms = {name: 1e3 * statistics.median(values[1:]) for name, values in times.items()}  # the first warms up
    out = {"pipeline_ttft_ms_median": ms["pipeline"], "server_ttft_ms_median": ms["server"],
           "added_ms_median": ms["server"] - ms["pipeline"], "server_httpx_ttft_ms_median": ms["server_httpx"],
           "added_httpx_ms_median": ms["server_httpx"] - ms["pipeline"], "repeats": args.repeats,
           "image": str(image) if image else None, "load_average": os.getloadavg()}
    if args.compare_source:
        out.update(compare_source=str(args.compare_source), compared_server_ttft_ms_median=ms["compared_server"],
                   compared_added_ms_median=ms["compared_server"] - ms["pipeline"])
        print(f"the server from {args.compare_source}: {ms['compared_server']:.2f} ms, "
              f"+{out['compared_added_ms_median']:.2f} ms")
    print(f"first token: Pipeline {ms['pipeline']:.2f} ms, server (streamed) {ms['server']:.2f} ms: the server "
          f"adds {out['added_ms_median']:.2f} ms (http.client; with httpx as the client {ms['server_httpx']:.2f} ms, "
          f"+{out['added_httpx_ms_median']:.2f} ms); medians of {args.repeats} alternated rounds")
    return out


# -- memory over sequential requests ----------------------------------------------------------------

def cmd_soak(args) -> dict:
    image = None if args.no_image else args.image
    server = ServerProcess(args.package, args.threads)
    samples = []
    try:
        body = request_body(server.model, args.prompt, image, args.max_tokens)
        with httpx.Client(timeout=600) as c:
            for i in range(args.requests + 1):
                if i % max(1, args.requests // 10) == 0:
                    samples.append({"requests": i, "rss_mb": server.rss_mb()})
                    print(f"after {i:>5} requests: RSS {samples[-1]['rss_mb']:.1f} MB", flush=True)
                if i < args.requests:
                    c.post(server.base + "/v1/chat/completions", json=body).raise_for_status()
    finally:
        server.stop()
    return {"samples": samples, "growth_mb_after_first_10pct": samples[-1]["rss_mb"] - samples[1]["rss_mb"]
            if len(samples) > 1 else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    for name in ("throughput", "ttft", "soak"):
        q = sub.add_parser(name)
        q.add_argument("--package", type=Path, required=True)
        q.add_argument("--threads", type=int, default=1, help="backend threads per replica")
        q.add_argument("--prompt", default="Describe the image in detail.")
        q.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
        q.add_argument("--no-image", action="store_true", help="text-only requests")
        q.add_argument("--out", type=Path, help="write the figures here as JSON")
        if name == "throughput":
            q.add_argument("--replicas", type=ints, default=[1, 2])
            q.add_argument("--concurrency", type=ints, default=[1, 4, 16])
            q.add_argument("--requests", type=int, default=32, help="per concurrency level (at least the clients)")
            q.add_argument("--max-tokens", type=int, default=32)
        elif name == "ttft":
            q.add_argument("--repeats", type=int, default=50)
            q.add_argument("--compare-source", type=Path,
                           help="also time a server run from this source folder (e.g. `git worktree add` of an "
                                "older commit), alternated with the others")
        else:
            q.add_argument("--requests", type=int, default=1000)
            q.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args()
    result = {"throughput": cmd_throughput, "ttft": cmd_ttft, "soak": cmd_soak}[args.cmd](args)
    result.update(machine=machine(), command=" ".join(sys.argv), threads=args.threads)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
