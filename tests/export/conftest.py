from tests.helpers import EXAMPLES, ORACLE  # noqa: F401  (test_export.py imports them from here)
