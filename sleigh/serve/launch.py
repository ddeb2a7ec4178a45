"""What `sleigh serve` does: check its options, load the model (so a bad package fails before the
port opens, as one line), then run uvicorn, or deploy on Ray Serve with `--ray`."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import time
from dataclasses import fields
from pathlib import Path

from sleigh.errors import SleighError, check_folder, first_line, flag
from sleigh.runtime.package import MODEL_FOLDER
from sleigh.serve import SHUTDOWN_TIMEOUT_S, check_shutdown_timeout

LOG_LEVELS = ("debug", "info", "warning", "error")
MiB = 1 << 20
# ServeSettings' fields set by a flag of another name (the rest: --field-name)
FLAGS = {"default_max_tokens": "--max-tokens", "max_body_bytes": "--max-body-mb"}
SERVE_APP = "sleigh"  # the Ray Serve application's name


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
    from sleigh.serve.app import MAX_BODY_BYTES, ServeSettings

    checks = [("--port", port, 1 <= port <= 65535, "1..65535"),
              ("--max-body-mb", max_body_mb, 0 < max_body_mb <= MAX_BODY_BYTES / MiB, f"in (0, {MAX_BODY_BYTES // MiB}]"),
              ("--log-level", log_level, log_level in LOG_LEVELS, " | ".join(LOG_LEVELS))]
    for what, value, ok, expected in checks:
        if not ok:
            raise SleighError(what, f"got {value}", expected)
    check_shutdown_timeout(shutdown_timeout)
    try:  # its own checks, named by the flags that set them
        settings = ServeSettings(model=model, backend=backend, engine=engine, threads=threads, model_name=model_name,
                                 max_queue=max_queue, max_body_bytes=max(1, int(max_body_mb * MiB)),
                                 max_image_pixels=max_image_pixels, allow_local_files=allow_local_files,
                                 default_max_tokens=max_tokens, max_memory=max_memory)
    except SleighError as e:
        raise SleighError(flag(e.what, FLAGS), e.problem, e.expected) from None
    if not ray:
        _check_ray_flags_unused(replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                                target_ongoing_requests=target_ongoing_requests, replica_cpus=replica_cpus,
                                ray_address=ray_address)
    scaling = None
    if ray:  # its options checked now, before the port and the model
        from sleigh.serve.ray_app import Scaling

        scaling = Scaling(replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                          target_ongoing_requests=target_ongoing_requests, replica_cpus=replica_cpus,
                          shutdown_timeout=shutdown_timeout)
    ray_address = ray_address or os.environ.get("RAY_ADDRESS") or "local"  # as ray.init would read it, but never
    # the last `ray start` cluster it would join unasked: the default is a cluster of this machine alone
    check_folder(model, MODEL_FOLDER)
    if not ray or ray_address == "local":  # before the model loads: a port in use costs nothing (a cluster's proxy
        check_address(host, port)  # is elsewhere)

    root = logging.getLogger()
    if not root.handlers:  # called from Python; the CLI has set up its `level: message` handler already
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root.setLevel(log_level.upper())  # basicConfig's level would not apply beside an existing handler
    if ray:
        _serve_ray(settings, host, port, scaling, ray_address, shutdown_timeout)
    else:
        _serve_uvicorn(settings, host, port, log_level, shutdown_timeout)


def _check_ray_flags_unused(**given) -> None:
    """Ray's options without --ray: one process serves one replica, so they would be ignored."""
    from sleigh.serve.ray_app import Scaling

    defaults = {f.name: f.default for f in fields(Scaling)}
    named = [flag(name) for name, value in given.items() if value != defaults.get(name)]
    if named:
        raise SleighError(", ".join(named), "only with --ray: without it one process serves one replica",
                          "--ray with them, or none of them")


def check_address(host: str, port: int) -> None:
    """One line where the server could not listen on host:port (a port in use, an address not this
    machine's, a host that does not resolve), checked by binding it once; uvicorn and Ray's proxy bind
    it again (a port taken in between still fails there)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise SleighError(f"--host {host}", f"does not resolve ({getattr(e, 'strerror', None) or e})",
                          "an address of this machine: 127.0.0.1, 0.0.0.0 (every interface), ::1, a host name") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            sock.bind(address)
        except OSError as e:
            raise SleighError(f"--host {host} --port {port}", f"cannot listen there ({e.strerror})",
                              "a port no other server holds, on an address of this machine") from None


def url(host: str, port: int) -> str:
    """http://host:port/v1, an IPv6 address in brackets."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def _serve_uvicorn(settings, host: str, port: int, log_level: str, shutdown_timeout: float) -> None:
    import uvicorn

    from sleigh.serve.app import create_app, load_worker

    worker = load_worker(settings)  # before the port opens: a bad package is one error line
    logging.getLogger("sleigh.serve").info("serving %s as %r on %s", settings.model, settings.name, url(host, port))
    uvicorn.run(create_app(settings, worker), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=shutdown_timeout)


def _serve_ray(settings, host, port, scaling, ray_address: str, shutdown_timeout) -> None:
    """`ray_address`: "local" (a new cluster of this machine alone, whose CPUs are all there will be),
    or a running cluster's (which may grow: its CPUs are not checked)."""
    import ray
    from ray import serve

    from sleigh.serve.app import load_worker
    from sleigh.serve.ray_app import build_app, drain, drain_actor_name, start_drain_signal

    if ray_address == "local":
        scaling.check_cpus(_local_cpus())  # before Ray starts (and prints), as one line
    load_worker(settings).close()  # the package loads here, or fails as one line before Ray starts
    ray.init(address=ray_address, include_dashboard=False)
    if ray_address == "local":
        try:
            scaling.check_cpus(ray.cluster_resources().get("CPU", 0.0))  # what Ray itself counted
        except SleighError:
            ray.shutdown()
            raise
    signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C (after ray.init, whose own handler it replaces)
    signal_actor = start_drain_signal(SERVE_APP)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings, scaling, drain_actor_name(SERVE_APP)), name=SERVE_APP, route_prefix="/")
    logging.getLogger("sleigh.serve").info("Ray Serve: %s as %r on %s (%s)", settings.model, settings.name,
                                           url(host, port), scaling)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log = logging.getLogger("sleigh.serve")
        log.info("shutting down: answers under way may finish for %g s", shutdown_timeout)
        # The replicas drain first (ray_app.drain: new requests get OpenAI's 503, those under way finish or
        # are cut off) while the proxy still carries their answers; then the application goes, and Ray stops
        # its replicas (each would finish what it still had for graceful_shutdown_timeout_s). serve.shutdown()
        # alone kills the proxy at once, dropping every connection.
        try:
            drain(signal_actor, shutdown_timeout, log)
        except Exception as e:  # noqa: BLE001 - the actor lost (its node gone): Ray's own drain still follows
            log.warning("draining the replicas failed (%s): Ray stops them on its own terms", first_line(e))
        finally:
            serve.delete(SERVE_APP)
            serve.shutdown()
            ray.shutdown()


def _local_cpus() -> float:
    """The CPUs a local Ray cluster gets: Ray's own count (a container's CPU quota included) where its
    helper is there, else the machine's."""
    try:
        from ray._private.utils import get_num_cpus

        return float(get_num_cpus())
    except Exception:  # noqa: BLE001 - a private helper: any other Ray version
        return float(os.cpu_count() or 1)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
