from tests.export.conftest import tiny_ckpt, tiny_pkg  # noqa: F401  (temporary: moves to tests/conftest.py)
