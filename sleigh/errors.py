"""The one exception type for user mistakes: the CLI prints it as one line, without a traceback."""


class SleighError(Exception):
    """A user error: `what | problem. Expected: ...`."""

    def __init__(self, what: str, problem: str, expected: str | None = None):
        self.what, self.problem, self.expected = what, problem, expected
        msg = f"{what} | {problem}"
        if expected:
            msg += f". Expected: {expected}"
        super().__init__(msg)
