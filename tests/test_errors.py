"""errors.first_line: the one line an error message keeps of an exception or a library's log text."""

from sleigh.errors import SleighError, first_line


def test_first_line_of_exceptions_and_messages():
    assert first_line(ValueError("bad shape\n  at node 3\n")) == "bad shape"
    assert first_line(RuntimeError()) == "RuntimeError"  # no message: the type says what happened
    assert first_line("  warning: slow path \nsecond line") == "warning: slow path"
    assert first_line("") == first_line("   \n") == ""  # an empty log message is empty, not "str"
    assert first_line("x" * 500, limit=10) == "x" * 10
    assert first_line(SleighError("a.onnx", "unreadable", "a model")) == "a.onnx | unreadable. Expected: a model"


def test_a_sleigh_error_pickles_whole():
    import pickle

    e = pickle.loads(pickle.dumps(SleighError("a.onnx", "unreadable", "a model")))
    assert (type(e), e.what, e.problem, e.expected, str(e)) == (SleighError, "a.onnx", "unreadable", "a model",
                                                                 "a.onnx | unreadable. Expected: a model")
