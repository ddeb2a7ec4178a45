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
    assert _convert("replicas", "2") == 2 and _convert("replica_cpus", "0.5") == 0.5
    options = Scaling(replicas=3).deployment_options(ServeSettings(model="x"))
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["graceful_shutdown_timeout_s"] == SHUTDOWN_TIMEOUT_S  # as `sleigh serve --shutdown-timeout`
    assert _convert("shutdown_timeout", "2.5") == 2.5
    auto = Scaling(min_replicas=1, max_replicas=4, target_ongoing_requests=2)
    cfg = auto.deployment_options(ServeSettings(model="x"))
    assert cfg["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}
    with pytest.raises(SleighError):
        Scaling(min_replicas=5, max_replicas=2)
    with pytest.raises(SleighError, match="--shutdown-timeout"):
        Scaling(shutdown_timeout=float("nan"))
