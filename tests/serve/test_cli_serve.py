"""`sleigh serve` option errors: one `error:` line, exit 2, before any port opens."""

from __future__ import annotations

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
    (["--model", "PKG", "--allow-local-files", "/nonexistent/dir"], "--allow-local-files"),
    (["--model", "PKG", "--ray", "--replicas", "0"], "--replicas"),
    (["--model", "PKG", "--ray", "--min-replicas", "3", "--max-replicas", "2"], "--min-replicas"),
])
def test_serve_option_errors(sleigh_cli, tmp_path, args, words):
    args = [str(tmp_path) if a == "PKG" else a for a in args]  # an empty folder: the options fail first
    line = one_error_line(sleigh_cli("serve", *args))
    assert words in line


def test_run_with_an_empty_stop_string_is_a_user_error(sleigh_cli, tiny_pkg):
    line = one_error_line(sleigh_cli("run", "--model", tiny_pkg, "--stop", ""))
    assert "stop" in line
