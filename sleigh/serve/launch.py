"""What `sleigh serve` does: check its options, load the model (so a bad package fails before the
port opens, as one line), then run uvicorn, or deploy on Ray Serve with `--ray`."""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

from sleigh.errors import SleighError
from sleigh.serve import SHUTDOWN_TIMEOUT_S, check_shutdown_timeout

LOG_LEVELS = ("debug", "info", "warning", "error")


def _require(*modules: str, extra: str = "serve") -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SleighError("sleigh serve", f"{', '.join(missing)} not installed", f"pip install 'sleigh[{extra}]'")


def launch(*, model: Path | None, engine: str | None, backend: str, threads: int | None, host: str, port: int,
           model_name: str | None, max_queue: int, max_tokens: int, max_body_mb: float, max_image_pixels: int,
           allow_local_files: Path | None, log_level: str, ray: bool, replicas: int, min_replicas: int | None,
           max_replicas: int | None, target_ongoing_requests: float, replica_cpus: float,
           ray_address: str | None, max_memory: int | None = None,
           shutdown_timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
    _require("fastapi", "uvicorn")
    if ray:
        _require("ray")
    if model is None:
        raise SleighError("--model", "no model given and $SLEIGH_MODEL is not set", "a package folder (sleigh export)")
    checks = [("--port", port, 1 <= port <= 65535, "1..65535"), ("--max-queue", max_queue, max_queue >= 0, ">= 0"),
              ("--max-tokens", max_tokens, max_tokens >= 1, ">= 1"),
              ("--max-body-mb", max_body_mb, 0 < max_body_mb <= 1024, "in (0, 1024]"),
              ("--max-image-pixels", max_image_pixels, max_image_pixels >= 1, ">= 1"),
              ("--threads", threads, threads is None or threads >= 1, ">= 1"),
              ("--log-level", log_level, log_level in LOG_LEVELS, " | ".join(LOG_LEVELS))]
    for what, value, ok, expected in checks:
        if not ok:
            raise SleighError(what, f"got {value}", expected)
    check_shutdown_timeout(shutdown_timeout)
    if allow_local_files is not None and not allow_local_files.is_dir():
        raise SleighError("--allow-local-files", f"{allow_local_files} is not a folder", "an existing folder")

    from sleigh.serve.app import ServeSettings

    settings = ServeSettings(model=model, backend=backend, engine=engine, threads=threads, model_name=model_name,
                             max_queue=max_queue, max_body_bytes=int(max_body_mb * (1 << 20)),
                             max_image_pixels=max_image_pixels, allow_local_files=allow_local_files,
                             default_max_tokens=max_tokens, max_memory=max_memory)
    root = logging.getLogger()
    if not root.handlers:  # called from Python; the CLI has set up its `level: message` handler already
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root.setLevel(log_level.upper())  # basicConfig's level would not apply beside an existing handler
    if ray:
        _serve_ray(settings, host, port, replicas, min_replicas, max_replicas, target_ongoing_requests, replica_cpus,
                   ray_address, shutdown_timeout)
    else:
        _serve_uvicorn(settings, host, port, log_level, shutdown_timeout)


def _serve_uvicorn(settings, host: str, port: int, log_level: str, shutdown_timeout: float) -> None:
    import uvicorn

    from sleigh.serve.app import create_app, load_worker

    worker = load_worker(settings)  # before the port opens: a bad package is one error line
    logging.getLogger("sleigh.serve").info("serving %s as %r on http://%s:%d/v1", settings.model, settings.name,
                                           host, port)
    uvicorn.run(create_app(settings, worker), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=shutdown_timeout)


def _serve_ray(settings, host, port, replicas, min_replicas, max_replicas, target_ongoing_requests, replica_cpus,
               ray_address, shutdown_timeout) -> None:
    import ray
    from ray import serve

    from sleigh.serve.app import load_worker
    from sleigh.serve.ray_app import Scaling, build_app

    scaling = Scaling(replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                      target_ongoing_requests=target_ongoing_requests, replica_cpus=replica_cpus,
                      shutdown_timeout=shutdown_timeout)
    load_worker(settings).close()  # the package loads here, or fails as one line before Ray starts
    ray.init(address=ray_address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings, scaling), name="sleigh", route_prefix="/")
    logging.getLogger("sleigh.serve").info("Ray Serve: %s as %r on http://%s:%d/v1 (%s)", settings.model,
                                           settings.name, host, port, scaling)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
