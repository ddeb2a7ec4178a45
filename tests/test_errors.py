"""errors.first_line: the one line an error message keeps of an exception or a library's log text."""

import re

import pytest

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


def _readers():
    from sleigh.runtime.manifest import read_manifest
    from sleigh.runtime.pipeline import Pipeline
    from sleigh.sleighvl.checkpoint import load_checkpoint

    return [(read_manifest, "a model package folder"), (load_checkpoint, "a Sleigh checkpoint folder"),
            (Pipeline.load, "a model package (sleigh export) or a Sleigh checkpoint folder")]


@pytest.mark.parametrize("which", range(3), ids=["manifest", "checkpoint", "pipeline"])
def test_a_missing_folder_is_not_found_and_a_file_is_not_a_folder(tmp_path, which):
    """`sleigh inspect/train/run nonexist` (build-engine, calibrate, compare, export too) said "not a
    folder" where nothing was (errors.check_folder, for each reader of a folder)."""
    read, expected = _readers()[which]
    with pytest.raises(SleighError, match=rf"nonexist \| not found\. Expected: {re.escape(expected)}"):
        read(tmp_path / "nonexist")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SleighError, match=r"file \| not a folder\."):
        read(tmp_path / "file")
