"""`sleigh serve` option errors: one `error:` line, exit 2, before any port opens."""

from __future__ import annotations

import json

import pytest

from tests.helpers import one_error_line


@pytest.mark.parametrize("args, words", [
    ([], "--model"),
    (["--model", "/nonexistent/pkg"], "not found"),
    (["--model", "PKG", "--port", "70000"], "--port"),
    (["--model", "PKG", "--max-queue", "-1"], "--max-queue"),
    (["--model", "PKG", "--max-body-mb", "0"], "--max-body-mb"),
    (["--model", "PKG", "--max-tokens", "0"], "--max-tokens"),
    (["--model", "PKG", "--threads", "0"], "--threads"),
    (["--model", "PKG", "--log-level", "loud"], "--log-level"),
    (["--model", "PKG", "--shutdown-timeout", "-1"], "--shutdown-timeout"),
    (["--model", "PKG", "--shutdown-timeout", "nan"], "--shutdown-timeout"),
    (["--model", "PKG", "--allow-local-files", "/nonexistent/dir"], "--allow-local-files"),
    (["--model", "PKG", "--ray", "--replicas", "0"], "--replicas"),
    (["--model", "PKG", "--ray", "--min-replicas", "3", "--max-replicas", "2"], "--min-replicas"),
    (["--model", "PKG", "--max-image-pixels", "300000000"], "--max-image-pixels"),  # past Pillow's own limit
    (["--model", "PKG", "--replicas", "3"], "--replicas | only with --ray"),
    (["--model", "PKG", "--max-replicas", "3", "--replica-cpus", "2"], "--max-replicas, --replica-cpus | only with --ray"),
    (["--model", "PKG", "--host", "999.1.1.1"], "--host 999.1.1.1 | does not resolve"),
    (["--model", "PKG", "--host", "192.0.2.1"], "cannot listen there"),  # TEST-NET-1: not this machine's
])
def test_serve_option_errors(sleigh_cli, tmp_path, args, words):
    from tests.serve.conftest import free_port

    args = [str(tmp_path) if a == "PKG" else a for a in args]  # an empty folder: the options fail first
    if "--port" not in args:  # not the default 8000, which a server of the developer's may hold
        args += ["--port", str(free_port())]
    line = one_error_line(sleigh_cli("serve", *args))
    assert words in line


def test_a_port_in_use_is_one_line_before_the_model_loads(sleigh_cli, tiny_pkg):
    """It loaded the model, said "serving ... on http://...", then uvicorn's own ERROR and exit 3."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = sleigh_cli("serve", "--model", tiny_pkg, "--port", str(port))
        # what is wrong with the command itself comes first
        assert "not found" in one_error_line(sleigh_cli("serve", "--model", "/nonexistent/pkg", "--port", str(port)))
        assert "--replicas" in one_error_line(sleigh_cli("serve", "--model", tiny_pkg, "--ray", "--replicas", "0",
                                                         "--port", str(port)))
    line = one_error_line(proc)
    assert line.startswith(f"error: --host 127.0.0.1 --port {port} | cannot listen there (Address already in use)"), line
    assert "serving" not in proc.stderr


def test_the_servers_url_brackets_an_ipv6_address():
    from sleigh.serve.launch import url

    assert url("::1", 8000) == "http://[::1]:8000/v1" and url("0.0.0.0", 80) == "http://0.0.0.0:80/v1"


def test_run_with_an_empty_stop_string_is_a_user_error(sleigh_cli, tiny_pkg):
    line = one_error_line(sleigh_cli("run", "--model", tiny_pkg, "--stop", ""))
    assert line.startswith("error: --stop | an empty stop string"), line


@pytest.mark.parametrize("level, shown", [("info", True), ("warning", False)])
def test_serve_log_level_applies_beside_the_clis_handler(tiny_pkg, capsys, monkeypatch, level, shown):
    """`sleigh serve --log-level info` shows the "serving ..." line: the CLI has set up its handler
    (at --log-level warning) by then, so the level must be set, not left to logging.basicConfig."""
    import logging

    import uvicorn

    from sleigh import cli
    from sleigh.serve.launch import launch

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    cli._setup_logging("warning")
    ran = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.append(kw))
    from tests.serve.conftest import free_port

    launch(model=tiny_pkg, engine=None, backend="auto", threads=1, host="127.0.0.1", port=free_port(), model_name=None,
           max_queue=4, max_tokens=16, max_body_mb=1, max_image_pixels=10**6, allow_local_files=None,
           log_level=level, ray=False, replicas=1, min_replicas=None, max_replicas=None,
           target_ongoing_requests=1, replica_cpus=1, ray_address=None)
    assert ran and ran[0]["log_level"] == level
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("info: serving ")]
    assert bool(lines) == shown, lines


@pytest.mark.parametrize("args, shown", [([], True), (["--log-level", "error"], False),
                                         (["--log-level", "error", "serve", "--log-level", "info"], True)])
def test_serve_takes_the_global_log_level_unless_given_its_own(tiny_pkg, monkeypatch, args, shown):
    """`sleigh --log-level error serve` stays quiet (serve's own default, info, does not override it);
    `sleigh serve` alone shows its info lines; serve's --log-level wins where given."""
    import logging

    import uvicorn
    from typer.testing import CliRunner

    from sleigh.cli import app

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    from tests.serve.conftest import free_port

    argv = [*args, *([] if "serve" in args else ["serve"]), "--model", str(tiny_pkg), "--threads", "1",
            "--port", str(free_port())]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert ("info: serving " in result.output) == shown, result.output


@pytest.mark.parametrize("running", ["stream", "plain"])
def test_shutdown_cuts_answers_under_way_off_after_its_timeout(tiny_pkg, tmp_path, running):
    """SIGINT with an answer under way (streamed, or a plain request past its first token) and a plain
    request waiting behind it: uvicorn alone waits for both to end (a long answer kept the server up for
    minutes); with --shutdown-timeout 0 both are cut off at once, a stream with an error event (no
    [DONE]), a plain request with a 503 error object (it was a text/plain 500, the cancellation a
    traceback in the log), and the server exits."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    import httpx

    from tests.helpers import cli_env
    from tests.serve.conftest import free_port, wait_healthy

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "sleigh.cli", "serve", "--model", str(tiny_pkg), "--port", str(port),
                                 "--threads", "1", "--shutdown-timeout", "0"], env=cli_env(), stdout=err, stderr=err)
    base = f"http://127.0.0.1:{port}"
    lines, plain, long_plain = [], [], []
    long = {"model": tiny_pkg.name, "messages": [{"role": "user", "content": "Go on."}], "max_tokens": 7000,
            "ignore_eos": True, "temperature": 0}

    def waiting():
        body = {"model": tiny_pkg.name, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 4}
        plain.append(httpx.post(base + "/v1/chat/completions", json=body, timeout=120))

    def stream():
        try:
            with httpx.stream("POST", base + "/v1/chat/completions", json={**long, "stream": True}, timeout=120) as r:
                lines.extend(line for line in r.iter_lines() if line)
        except httpx.TransportError:
            pass

    def answering():  # a plain request: under way once the server has timed its first token
        return "sleigh_time_to_first_token_seconds_count 1" in httpx.get(base + "/metrics", timeout=10).text

    try:
        wait_healthy(base, proc)
        if running == "stream":
            reader = threading.Thread(target=stream)
        else:
            reader = threading.Thread(target=lambda: long_plain.append(httpx.post(base + "/v1/chat/completions",
                                                                                  json=long, timeout=120)))
        reader.start()
        deadline = time.monotonic() + 60
        while not (len(lines) >= 3 if running == "stream" else answering()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(lines) >= 3 or running == "plain" and answering(), log.read_text()[-2000:]
        behind = threading.Thread(target=waiting)
        behind.start()
        time.sleep(0.5)  # queued behind the answer under way
        t = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]
        took = time.monotonic() - t
        reader.join(timeout=30)
        behind.join(timeout=30)
    finally:
        proc.kill()
    assert took < 10, took
    if running == "stream":
        assert "data: [DONE]" not in lines and len(lines) < 7000, len(lines)  # cut off, not finished
        assert "cut this answer off" in json.loads(lines[-1].removeprefix("data: "))["error"]["message"]
    else:
        assert long_plain, "the answer under way got no response"
        assert long_plain[0].status_code == 503 and "cut this answer off" in long_plain[0].json()["error"]["message"]
    assert plain, "the waiting request got no answer"
    assert plain[0].status_code == 503 and "cut this answer off" in plain[0].json()["error"]["message"]
    text = log.read_text()
    assert "timeout graceful shutdown exceeded" in text and "Traceback" not in text, text[-3000:]
