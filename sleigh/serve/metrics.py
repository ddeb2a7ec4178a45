"""The server's few Prometheus metrics, written in the text exposition format (version 0.0.4).

Small enough to keep without prometheus_client: counters, two gauges read at scrape time and two
histograms. Updated from the event loop and read from it, with a lock for safety.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKENS_PER_S_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * len(buckets)
        self.count, self.sum = 0, 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        lines += [f'{self.name}_bucket{{le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {_num(self.sum)}",
                  f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    def __init__(self, queue_depth: Callable[[], int], running: Callable[[], int]):
        self._lock = threading.Lock()
        self._queue_depth, self._running = queue_depth, running
        self.requests: dict[str, int] = {}  # by HTTP status code
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cancelled = 0
        self.ttft = Histogram("sleigh_time_to_first_token_seconds",
                              "From the request's arrival to its first token (queueing included).", TTFT_BUCKETS)
        self.decode_rate = Histogram("sleigh_decode_tokens_per_second",
                                     "Decode speed of each completed generation.", TOKENS_PER_S_BUCKETS)

    def request(self, status: int) -> None:
        with self._lock:
            self.requests[str(status)] = self.requests.get(str(status), 0) + 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def finished(self, prompt_tokens: int, completion_tokens: int, tokens_per_s: float) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            if tokens_per_s > 0:
                self.decode_rate.observe(tokens_per_s)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled += 1

    def render(self) -> str:
        with self._lock:
            errors = sum(n for code, n in self.requests.items() if int(code) >= 400)
            lines = ["# HELP sleigh_requests_total Chat completion requests answered, by HTTP status.",
                     "# TYPE sleigh_requests_total counter"]
            lines += [f'sleigh_requests_total{{code="{c}"}} {n}' for c, n in sorted(self.requests.items())]
            lines += _scalar("sleigh_request_errors_total", "counter", "Requests answered with a 4xx or 5xx status.",
                             errors)
            lines += _scalar("sleigh_requests_cancelled_total", "counter",
                             "Generations stopped because their client disconnected.", self.cancelled)
            lines += _scalar("sleigh_queue_depth", "gauge", "Requests waiting for the model.", self._queue_depth())
            lines += _scalar("sleigh_requests_running", "gauge", "Generations running (0 or 1 per replica).",
                             self._running())
            lines += _scalar("sleigh_prompt_tokens_total", "counter", "Prompt tokens of completed requests.",
                             self.prompt_tokens)
            lines += _scalar("sleigh_completion_tokens_total", "counter", "Generated tokens of completed requests.",
                             self.completion_tokens)
            lines += self.ttft.render() + self.decode_rate.render()
        return "\n".join(lines) + "\n"


def _scalar(name: str, kind: str, help_text: str, value) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_num(value)}"]


def _num(x) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)
