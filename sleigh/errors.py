"""The one exception type for user mistakes: the CLI prints it as one line, without a traceback."""


def first_line(exc: BaseException | str, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when empty) or of a library's log
    message, for one-line errors."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    return text.splitlines()[0].rstrip()[:limit]


class SleighError(Exception):
    """A user error: `what | problem. Expected: ...`."""

    def __init__(self, what: str, problem: str, expected: str | None = None):
        self.what, self.problem, self.expected = what, problem, expected
        msg = f"{what} | {problem}"
        if expected:
            msg += f". Expected: {expected}"
        super().__init__(msg)

    def __reduce__(self):  # raised in a child process (an isolated export), it crosses back whole
        return SleighError, (self.what, self.problem, self.expected)


def flag(name: str, renamed: dict | None = None) -> str:
    """The command-line flag of a parameter or option field: `max_new_tokens` -> `--max-new-tokens`,
    unless `renamed` gives it another (`gate_images` -> `--images`)."""
    return (renamed or {}).get(name) or "--" + name.replace("_", "-")


def check_folder(path, expected: str) -> None:
    """A folder that must be there: "not found" where nothing is, "not a folder" where something else is."""
    if not path.is_dir():
        raise SleighError(str(path), "not a folder" if path.exists() else "not found", expected)


SEED_MAX = 2**63 - 1  # what torch.manual_seed and numpy's generators both take


def check_seed(what: str, seed) -> None:
    """A seed for torch and numpy: an integer from 0 to SEED_MAX (numpy refuses negative ones and torch
    overflows past 64 bits, each with an error that names neither the flag nor the range)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise SleighError(what, f"got {seed!r}", f"an integer from 0 to {SEED_MAX} (2**63 - 1)")
