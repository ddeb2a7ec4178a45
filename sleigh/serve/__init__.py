"""`sleigh serve`: an OpenAI-compatible chat-completions server on the torch-free runtime
(`pip install 'sleigh[serve]'`), and its Ray Serve deployment for more replicas.

Modules: protocol (requests, errors, responses), worker (one Pipeline, one generation at a time),
metrics (Prometheus text), app (the FastAPI app), ray_app (Ray Serve).
"""

# After SIGINT/SIGTERM, answers under way may finish for this long; then they are cut off (a stream ends
# without its [DONE]) and the worker stops at its next token. Gunicorn's graceful timeout, and the
# 30 s Kubernetes gives a pod between SIGTERM and SIGKILL. (`serve --shutdown-timeout`; Ray Serve's
# graceful_shutdown_timeout_s for its replicas)
SHUTDOWN_TIMEOUT_S = 30.0
# The server's defaults, here where the CLI reads them without importing the server (app.ServeSettings,
# ray_app.Scaling and `sleigh serve`'s flags take them from here)
MAX_QUEUE = 16  # requests waiting beyond the running one; more get 503 + Retry-After
MAX_BODY_MB = 20  # MiB: a request body past it is a 413
MAX_IMAGE_PIXELS = 40_000_000  # a 12-tile grid is 2.4 Mpx; the rest is downscaled away
REPLICAS = 1  # with --ray
TARGET_ONGOING_REQUESTS = 1.0  # per replica: one running generation keeps a replica busy
REPLICA_CPUS = 1.0  # Ray CPUs reserved by each replica (its ONNX Runtime threads: --threads)


def check_shutdown_timeout(seconds: float) -> None:
    """--shutdown-timeout: 0 (cut off at once) to a day."""
    from sleigh.errors import SleighError

    if not 0 <= seconds <= 86400:  # NaN too
        raise SleighError("--shutdown-timeout", f"got {seconds}", "0 to 86400 seconds")
