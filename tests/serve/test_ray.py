"""`sleigh serve` on Ray Serve: a local 2-replica deployment answering concurrent requests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serve.conftest import free_port, wait_healthy

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")


@pytest.mark.slow
def test_two_replicas_answer_concurrent_requests(tiny_pkg, monkeypatch):
    from sleigh.serve.app import ServeSettings
    from sleigh.serve.ray_app import Scaling, build_app

    # Ray Serve kills a proxy that misses its 5 s ready / 10 s health checks: on two cores shared with
    # another test worker it can (seen twice under load), so the cluster started below gets 60 s.
    for name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        monkeypatch.setenv(name, "60")
    settings = ServeSettings(model=tiny_pkg, threads=1)
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings, Scaling(replicas=2, replica_cpus=0.5)), name="sleigh", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, timeout=60)
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        alone = client.chat.completions.create(model=settings.name, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=8, temperature=0)

        def ask(_):
            return client.chat.completions.create(model=settings.name, messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=8, temperature=0)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
        assert len({a.id for a in answers}) == 8
        assert all(a.choices[0].message.content == alone.choices[0].message.content for a in answers)
        assert len({a.model_extra["sleigh"]["replica"] for a in [alone, *answers]}) == 2  # both replicas served
        stream = client.chat.completions.create(model=settings.name, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=8, temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == alone.choices[0].message.content  # server-sent events through Ray's proxy
        bad = httpx.post(base + "/v1/chat/completions", content=b"{not json", timeout=30)
        assert bad.status_code == 400 and "error" in bad.json()
        from sleigh.errors import SleighError
        from sleigh.serve.ray_app import start_drain_signal

        first = start_drain_signal("twice")  # held: an actor with no handle left is gone
        # a second driver of the same application on this cluster: one line
        with pytest.raises(SleighError, match=r"Ray application 'twice' \| is already served on this Ray cluster"):
            start_drain_signal("twice")
        assert ray.get(first.settled.remote())  # the first one lives on (no replica follows it)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_app_builder_arguments():
    """`serve run sleigh.serve.ray_app:app_builder key=value ...`: the keys are checked, values converted."""
    from sleigh.errors import SleighError
    from sleigh.serve.app import ServeSettings
    from sleigh.serve import SHUTDOWN_TIMEOUT_S
    from sleigh.serve.ray_app import Scaling, _convert, app_builder

    with pytest.raises(SleighError, match="model=PKG"):
        app_builder({"replicas": "2"})
    with pytest.raises(SleighError, match="unknown"):
        app_builder({"model": "x", "replcas": "2"})
    assert _convert("replicas", "2", "int") == 2 and _convert("replica_cpus", "0.5", "float") == 0.5
    assert _convert("max_memory", "2.5G", "int | None") == int(2.5 * 2**30)
    assert _convert("engine", None, "str | None") is None and _convert("threads", None, "int | None") is None  # YAML null
    with pytest.raises(SleighError, match=r"^serve run threads=two \| not an int"):
        app_builder({"model": "x", "threads": "two"})
    # ServeSettings checks its fields itself: `serve run` skipped every check `sleigh serve` made
    for key, value, says in (("max_queue", "-1", "got -1. Expected: >= 0"), ("default_max_tokens", "0", "got 0"),
                             ("max_image_pixels", "0", "Pillow's limit"), ("allow_local_files", "/no/such", "not a folder")):
        with pytest.raises(SleighError, match=rf"^{key} \| .*{says}"):
            app_builder({"model": "x", key: value})
    options = Scaling(replicas=3).deployment_options(ServeSettings(model="x"))
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["graceful_shutdown_timeout_s"] == SHUTDOWN_TIMEOUT_S  # as `sleigh serve --shutdown-timeout`
    assert _convert("shutdown_timeout", "2.5", "float") == 2.5
    auto = Scaling(min_replicas=1, max_replicas=4, target_ongoing_requests=2)
    cfg = auto.deployment_options(ServeSettings(model="x"))
    assert cfg["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}
    with pytest.raises(SleighError):
        Scaling(min_replicas=5, max_replicas=2)
    with pytest.raises(SleighError, match="--shutdown-timeout"):
        Scaling(shutdown_timeout=float("nan"))
    Scaling(replicas=2, replica_cpus=1.0).check_cpus(2.0)
    with pytest.raises(SleighError, match=r"^--replicas 3 --replica-cpus 1 \| 3 replicas of 1 CPUs need 3; this Ray cluster has 2\."):
        Scaling(replicas=3).check_cpus(2.0)
    with pytest.raises(SleighError, match=r"^--min-replicas 2 --replica-cpus 1.5 \| 2 replicas of 1.5 CPUs need 3;"):
        Scaling(min_replicas=2, max_replicas=4, replica_cpus=1.5).check_cpus(2.0)


@pytest.mark.slow
def test_replicas_past_the_machines_cpus_are_one_line_not_a_wait_forever(sleigh_cli, tiny_pkg):
    """Ray waited for CPUs that never came, saying so every 30 s; `sleigh serve` never said it served."""
    from tests.helpers import one_error_line

    line = one_error_line(sleigh_cli("serve", "--model", tiny_pkg, "--ray", "--replica-cpus", "1000", "--threads", "1",
                                     "--port", str(free_port())))
    assert line.startswith("error: --replicas 1 --replica-cpus 1000 | 1 replica of 1000 CPUs need 1000; this Ray cluster has "), line


class _StreamingRay:
    """`sleigh serve --ray` on the tiny package (one replica) in its own process, with a greedy stream of
    7,000 tokens under way (at least 3 events in) once started; `lines` are its events as they come."""

    def __init__(self, tiny_pkg, tmp_path, shutdown_timeout: float):
        import subprocess
        import sys
        import threading
        import time

        from tests.helpers import cli_env

        port = free_port()
        env = {**cli_env(), "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}
        self.log, self.model, self.lines = tmp_path / "serve.log", tiny_pkg.name, []
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "sleigh.cli", "serve", "--model", str(tiny_pkg), "--port",
                                          str(port), "--ray", "--replica-cpus", "0.5", "--threads", "1",
                                          "--shutdown-timeout", str(shutdown_timeout)], env=env, stdout=out, stderr=out)
        self.base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(self.base, self.proc, timeout=120)
            deadline = time.monotonic() + 60
            while "Ray Serve: " not in self.log.read_text() and time.monotonic() < deadline:  # serve.run has returned
                time.sleep(0.1)
            self.reader = threading.Thread(target=self._stream)
            self.reader.start()
            deadline = time.monotonic() + 60
            while len(self.lines) < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
        except BaseException:
            self.proc.kill()
            raise

    def _stream(self) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": "Go on."}], "stream": True,
                "max_tokens": 7000, "ignore_eos": True, "temperature": 0}
        try:
            with httpx.stream("POST", self.base + "/v1/chat/completions", json=body, timeout=120) as r:
                self.lines.extend(line for line in r.iter_lines() if line)
        except httpx.TransportError as e:
            self.lines.append(f"cut: {e}")

    def ask(self) -> httpx.Response:
        body = {"model": self.model, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 4}
        return httpx.post(self.base + "/v1/chat/completions", json=body, timeout=120)

    def stop(self, *threads) -> None:
        """SIGTERM; the stream and `threads` joined; the server must exit 0."""
        import signal

        self.proc.send_signal(signal.SIGTERM)
        for t in (self.reader, *threads):
            t.join(timeout=90)
        assert self.proc.wait(timeout=90) == 0, self.log.read_text()[-3000:]


@pytest.mark.slow
def test_sigterm_under_ray_lets_the_answer_under_way_finish(tiny_pkg, tmp_path):
    """`sleigh serve --ray` on SIGTERM died at once (and on Ctrl-C killed Ray's proxy at once): a
    stream under way was cut within 0.1 s whatever --shutdown-timeout said. The replicas drain first now
    (ray_app.drain) while Ray's proxy still carries the answer, and a new request meanwhile gets OpenAI's
    503 from a replica (it got the proxy's 404 once the application was deleted)."""
    import json
    import threading

    ray_serve, refused = _StreamingRay(tiny_pkg, tmp_path, shutdown_timeout=60), []
    try:
        asking = threading.Thread(target=lambda: refused.append(_refused_while_draining(ray_serve)))
        asking.start()
        ray_serve.stop(asking)
    finally:
        ray_serve.proc.kill()
    lines = ray_serve.lines
    assert refused and refused[0].status_code == 503, refused  # OpenAI's shape, not Ray's 404
    assert refused[0].headers["Retry-After"] == "1" and refused[0].json()["error"]["type"] == "service_unavailable_error"
    assert "shutting down and takes no new requests" in refused[0].json()["error"]["message"]
    assert lines[-1] == "data: [DONE]", (lines[-1:], ray_serve.log.read_text()[-2000:])
    usage = json.loads(lines[-2].removeprefix("data: "))
    assert len(usage["sleigh"]["token_ids"]) == 7000  # the whole answer, after the signal


def _refused_while_draining(ray_serve: _StreamingRay, timeout: float = 60) -> httpx.Response:
    """A new request once /health says the replica drains (polled: the signal reaches it within a poll)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(ray_serve.base + "/health", timeout=10)
        if health.status_code == 503 and health.json().get("status") == "draining":
            break
        time.sleep(0.05)
    return ray_serve.ask()


@pytest.mark.slow
def test_sigterm_under_ray_cuts_answers_off_after_the_timeout_as_without_ray(tiny_pkg, tmp_path):
    """Past --shutdown-timeout, Ray cut an answer under way with its own 500 (a plain request) or a dropped
    connection (a stream). The replica now cuts them off itself, as `sleigh serve` without Ray does: a
    stream ends with an error event (no [DONE]), a request waiting behind it gets a 503 error object."""
    import json
    import threading
    import time

    ray_serve, plain = _StreamingRay(tiny_pkg, tmp_path, shutdown_timeout=1), []
    try:
        behind = threading.Thread(target=lambda: plain.append(ray_serve.ask()))
        behind.start()
        deadline = time.monotonic() + 30
        while "sleigh_queue_depth 1" not in httpx.get(ray_serve.base + "/metrics", timeout=10).text:  # queued behind it
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.05)
        ray_serve.stop(behind)
    finally:
        ray_serve.proc.kill()
    lines = ray_serve.lines
    assert "data: [DONE]" not in lines and len(lines) < 7000, (len(lines), lines[-1:])  # cut off after 1 s, not finished
    assert "cut this answer off" in json.loads(lines[-1].removeprefix("data: "))["error"]["message"], lines[-1:]
    assert plain and plain[0].status_code == 503, plain
    assert "cut this answer off" in plain[0].json()["error"]["message"]
    text = ray_serve.log.read_text()
    assert "cutting off the answers still under way" in text and "Traceback" not in text, text[-3000:]


def test_the_drain_settles_when_every_replica_acts_on_the_phase_with_nothing_under_way(monkeypatch):
    """DrainSignal.settled: a replica counts once it has polled since the phase changed, reporting that
    phase and no request under way; one not heard from for HEARD_S is gone and does not hold the drain."""
    from sleigh.serve import ray_app
    from sleigh.serve.ray_app import HEARD_S, DrainSignal

    now = [100.0]
    monkeypatch.setattr(ray_app.time, "monotonic", lambda: now[0])
    signal = DrainSignal()
    assert signal.poll("a", "serving", 2) == "serving" and signal.poll("b", "serving", 0) == "serving"
    now[0] += 1
    signal.set_phase("draining")
    assert not signal.settled()  # neither has polled since
    now[0] += 0.2
    assert signal.poll("a", "serving", 2) == "draining"  # it learns the phase now; acting on it comes after
    assert signal.poll("b", "draining", 0) == "draining"
    assert not signal.settled()  # a still reports the old phase
    now[0] += 0.2
    signal.poll("a", "draining", 1)
    assert not signal.settled()  # a still has an answer under way
    now[0] += 0.2
    signal.poll("a", "draining", 0)
    assert signal.settled()
    now[0] += 0.2
    signal.set_phase("cut")
    now[0] += 0.2
    signal.poll("a", "cut", 0)
    assert not signal.settled()  # b, heard from lately, has not polled since the cut
    now[0] += HEARD_S
    signal.poll("a", "cut", 0)
    assert signal.settled()  # b has gone quiet (Ray stopped it): only a counts
