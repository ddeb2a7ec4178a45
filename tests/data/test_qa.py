"""Question/answer JSONL as other tools write it: lines end at "\\n" alone, a BOM or CRLF changes
nothing, one bad line is one skipped line, and labels of the wrong form are dropped (sleigh/data/qa.py)."""

from __future__ import annotations

import json
import re
import warnings

import pytest
from PIL import Image

from sleigh.data.qa import UNTYPED, read_qa
from sleigh.errors import SleighError
from tests.runtime.test_image import huge_png


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (32, 24), (200, 30, 30)).save(tmp_path / "img.png")
    return tmp_path


def line(**fields) -> str:
    return json.dumps({"image": "img.png", "question": "What colour?", "answer": "red", **fields}, ensure_ascii=False)


def test_lines_end_at_newline_alone_and_a_bom_and_crlf_change_nothing(folder):
    text = line(question="Line\u2028separator and\u0085next line?") + "\r\n" + line() + "\r\n" + '{"image": "img.png"}\n'
    (folder / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    qa = read_qa(folder / "d.jsonl")
    assert [q.line for q in qa.items] == [1, 2]
    assert qa.items[0].question == "Line\u2028separator and\u0085next line?"
    assert qa.skipped == {"missing field": 1} and qa.first_skipped == {"missing field": 3}


def test_a_line_that_is_not_utf8_is_one_skipped_line(folder):
    (folder / "d.jsonl").write_bytes(line().encode() + b"\n" + line(answer="caf\u00e9").encode("latin-1") + b"\n" + line().encode())
    qa = read_qa(folder / "d.jsonl")
    assert [q.line for q in qa.items] == [1, 3] and qa.skipped == {"not UTF-8": 1} and qa.first_skipped == {"not UTF-8": 2}
    with pytest.raises(SleighError, match=r"d\.jsonl:2 \| not UTF-8"):
        read_qa(folder / "d.jsonl", strict=True)


def test_types_are_checked_and_labels_of_the_wrong_form_dropped(folder):
    (folder / "sub").mkdir()
    lines = [line(type="colour", meta={"colour": "red", "box": [1, 2, 3, 4.5], "size": [32, 24], "extra": {"x": 1}}),
             line(meta={"colour": ["red"], "shape": 3, "box": "abc", "size": [1, "a"], "position": "left"}),
             line(meta={"box": [1, 2], "size": [0, 3]}),
             line(answer=5), line(type=0), line(image="sub"), line(type=None)]
    (folder / "d.jsonl").write_text("\n".join(lines) + "\n")
    qa = read_qa(folder / "d.jsonl")
    assert [q.line for q in qa.items] == [1, 2, 3, 7]
    assert qa.items[0].type == "colour" and qa.items[1].type == qa.items[3].type == UNTYPED  # null: as absent
    assert qa.items[0].meta == {"colour": "red", "box": [1, 2, 3, 4.5], "size": [32, 24], "extra": {"x": 1}}
    assert qa.items[1].meta == {"position": "left"} and qa.items[2].meta == {}
    assert qa.skipped == {"wrong type": 2, "image not a file": 1}


def test_an_image_past_pillows_limit_is_skipped_quietly(folder):
    huge_png(folder / "bomb.png", 15000, 15000)  # past Pillow's error limit: DecompressionBombError
    huge_png(folder / "large.png", 10000, 10000)  # between its warning and error limits
    (folder / "d.jsonl").write_text("\n".join([line(image="bomb.png"), line(image="large.png"), line()]) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would be a stray `warning:` line
        qa = read_qa(folder / "d.jsonl")
    assert [q.line for q in qa.items] == [2, 3] and qa.skipped == {"image too large to open": 1}  # not "unreadable"
    with pytest.raises(SleighError, match=r"d\.jsonl:1 \| image too large to open \(.*bomb\.png: Image size \(225000000 "
                                          r"pixels\) exceeds limit"):
        read_qa(folder / "d.jsonl", strict=True)


def test_no_usable_lines_says_where_the_first_image_was_looked_for(folder):
    (folder / "data").mkdir()
    (folder / "data" / "d.jsonl").write_text(line(image="cases/img.png") + "\n")
    with pytest.raises(SleighError) as err:
        read_qa(folder / "data" / "d.jsonl")
    message = str(err.value)
    assert f"line 1: missing image ({folder / 'data' / 'cases' / 'img.png'})" in message
    assert "relative to the JSONL's folder" in message


def test_a_symlinked_jsonl_reads_the_images_beside_its_target(folder, tmp_path_factory):
    """A link to a dataset's JSONL reads that dataset's images; it read files of the same names beside
    the link (here a blue image of the same name, which would have trained on the wrong picture)."""
    (folder / "d.jsonl").write_text(line() + "\n")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(elsewhere / "img.png")
    (elsewhere / "link.jsonl").symlink_to(folder / "d.jsonl")
    assert read_qa(elsewhere / "link.jsonl").items[0].image == folder / "img.png"
    (folder / "img.png").unlink()  # and a missing image is looked for beside the target, not the link
    with pytest.raises(SleighError, match=rf"missing image \({re.escape(str(folder / 'img.png'))}\)"):
        read_qa(elsewhere / "link.jsonl")
    (elsewhere / "dir").symlink_to(folder, target_is_directory=True)  # a linked folder: its own files, as before
    Image.new("RGB", (8, 8)).save(folder / "img.png")
    assert read_qa(elsewhere / "dir").items[0].image == elsewhere / "dir" / "img.png"


def test_a_folder_named_like_a_jsonl_file_is_not_one(folder):
    (folder / "d.jsonl").write_text(line() + "\n")
    (folder / "images.jsonl").mkdir()
    assert read_qa(folder).path == folder / "d.jsonl"


def test_data_that_is_neither_a_file_nor_a_folder_says_what_it_is(tmp_path):
    """/dev/null and a FIFO were "not found": they exist, but hold no lines to read (a FIFO blocks)."""
    import os

    fifo = tmp_path / "d.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(SleighError, match=r"d\.jsonl \| is not a regular file or a folder \(a FIFO\)"):
        read_qa(fifo)
    if os.path.exists("/dev/null"):
        with pytest.raises(SleighError, match=r"/dev/null \| is not a regular file or a folder \(a character device\)"):
            read_qa("/dev/null")
    with pytest.raises(SleighError, match=r"none\.jsonl \| not found"):
        read_qa(tmp_path / "none.jsonl")


def test_an_empty_image_path_is_called_empty(folder):
    """`"image": ""` was "image not a file (FOLDER)": the empty path is the JSONL's own folder."""
    (folder / "d.jsonl").write_text(line(image="") + "\n" + line() + "\n")
    qa = read_qa(folder / "d.jsonl")
    assert [q.line for q in qa.items] == [2] and qa.skipped == {"empty image path": 1}
    with pytest.raises(SleighError, match=r"d\.jsonl:1 \| empty image path"):
        read_qa(folder / "d.jsonl", strict=True)
