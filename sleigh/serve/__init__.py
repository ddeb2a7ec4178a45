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


def check_shutdown_timeout(seconds: float) -> None:
    """--shutdown-timeout: 0 (cut off at once) to a day."""
    from sleigh.errors import SleighError

    if not 0 <= seconds <= 86400:  # NaN too
        raise SleighError("--shutdown-timeout", f"got {seconds}", "0 to 86400 seconds")
