"""A `sleigh serve` on the tiny package, started once for the serve tests through the CLI, on a free
port, with small limits so the limit cases are cheap to hit."""

from __future__ import annotations

import base64
import io
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import cli_env

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

MAX_BODY_MB = 1
MAX_IMAGE_PIXELS = 1_000_000
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen | None = None, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}): {proc.stderr.read()}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{base} not healthy after {timeout} s")


class Server:
    def __init__(self, base: str, model: str, package: Path, files: Path):
        self.base, self.model, self.package, self.files = base, model, package, files

    def post(self, body, **kw) -> httpx.Response:
        """POST /v1/chat/completions with a dict (as JSON) or raw bytes."""
        if isinstance(body, (bytes, str)):
            return httpx.post(self.base + "/v1/chat/completions", content=body, timeout=120, **kw)
        return httpx.post(self.base + "/v1/chat/completions", json=body, timeout=120, **kw)

    def metric(self, name: str) -> float:
        for line in httpx.get(self.base + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@pytest.fixture(scope="session")
def server(tiny_pkg, tmp_path_factory):
    files = tmp_path_factory.mktemp("served-files")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sleigh.cli", "serve", "--model", str(tiny_pkg), "--port", str(port),
         "--max-body-mb", str(MAX_BODY_MB), "--max-image-pixels", str(MAX_IMAGE_PIXELS), "--max-queue", "16",
         "--allow-local-files", str(files), "--threads", "1", "--log-level", "warning"],
        env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        yield Server(base, tiny_pkg.name, tiny_pkg, files)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="session")
def small_png(tmp_path_factory) -> Path:
    """A small square PNG: grid 1x1, one view (cheap on the tiny model)."""
    path = tmp_path_factory.mktemp("images") / "small.png"
    path.write_bytes(png_bytes(128, 128))
    return path
