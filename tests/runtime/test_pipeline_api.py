"""The Python API as a library user calls it: a wrong argument is one SleighError naming the
parameter (never a TypeError from deep inside), a str `stop` is one stop string (OpenAI's `stop`), a
finished Generation keeps its result, a continued prefill is held to the context, and the image limit
is the CLI's (a parameter, `max_pixels`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sleigh.errors import SleighError
from sleigh.runtime.image import default_max_pixels
from sleigh.runtime.pipeline import ContextExceeded, Pipeline
from sleigh.runtime.prompt import Turn

EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.fixture(scope="module")
def pipe(tiny_pkg):
    with Pipeline.load(tiny_pkg, threads=1) as p:
        yield p


@pytest.mark.parametrize("kwargs, name", [
    ({"threads": 0}, "threads"), ({"threads": "2"}, "threads"), ({"threads": 2.5}, "threads"),
    ({"max_memory": 2.5}, "max_memory"), ({"max_memory": 0}, "max_memory"), ({"max_memory": True}, "max_memory"),
])
def test_load_arguments(tiny_pkg, kwargs, name):
    with pytest.raises(SleighError, match=rf"^{name} \|"):
        Pipeline.load(tiny_pkg, **kwargs)


def test_load_without_a_path():
    with pytest.raises(SleighError, match=r"^path \|"):
        Pipeline.load(None)


@pytest.mark.parametrize("kwargs, name", [
    ({"max_new_tokens": "5"}, "max_new_tokens"), ({"max_new_tokens": None}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"), ({"max_new_tokens": True}, "max_new_tokens"),
    ({"sampling": {"temperature": 1}}, "sampling"),
    ({"stop": None}, "stop"), ({"stop": [3]}, "stop"), ({"stop": ["ok", b"no"]}, "stop"),
    ({"prompt": None}, "prompt"), ({"prompt": 5}, "prompt"), ({"prompt": [("user", "hi")]}, "prompt"),
    ({"system": 5}, "system"), ({"max_tiles": "2"}, "max_tiles"), ({"max_tiles": 0}, "max_tiles"),
    ({"max_pixels": 0}, "max_pixels"),
])
def test_generate_arguments(pipe, kwargs, name):
    args = {"image": EXAMPLES / "coffee.jpg", "prompt": "hi", "max_new_tokens": 2, **kwargs}
    with pytest.raises(SleighError, match=rf"^{name} \|"):
        pipe.generate(**args).result


def test_a_conversation_of_turns_is_still_a_prompt(pipe):
    text = pipe.generate(None, [Turn("user", "hi")], max_new_tokens=2, ignore_eos=True).result.token_ids
    assert text == pipe.generate(None, "hi", max_new_tokens=2, ignore_eos=True).result.token_ids


def test_a_str_stop_is_one_stop_string(pipe):
    """`stop="ue"` once stopped at any "u" or "e" (a str iterated as characters)."""
    free = pipe.generate(None, "Tell me a story", max_new_tokens=24, ignore_eos=True).result
    assert len(free.text) > 4
    word = free.text[1:4]  # text the answer holds, past its first character
    one = pipe.generate(None, "Tell me a story", max_new_tokens=24, ignore_eos=True, stop=word).result
    assert one.text == free.text[:free.text.index(word)] and one.stop_reason == "stop"
    absent = "\u2603" * 2  # a stop string the answer never holds: nothing stops it, though its characters repeat
    assert pipe.generate(None, "Tell me a story", max_new_tokens=24, ignore_eos=True, stop=absent).result.text == free.text
    listed = pipe.generate(None, "Tell me a story", max_new_tokens=24, ignore_eos=True, stop=[word]).result
    assert listed.text == one.text


def test_a_finished_generation_keeps_its_result(pipe):
    gen = pipe.generate(None, "hi", max_new_tokens=3, ignore_eos=True)
    pieces = list(gen)
    result = gen.result
    assert "".join(pieces) == result.text
    assert list(gen) == [] and gen.result is result  # iterating again yields nothing and loses nothing


def test_generate_from_is_held_to_the_context(pipe):
    """It once ran past the context into ONNX Runtime's own error at the last slot."""
    state = pipe.prefill(None, "hi")
    with pytest.raises(ContextExceeded, match="exceed the context"):
        pipe.generate_from(state, max_new_tokens=pipe.context_length, ignore_eos=True)
    left = pipe.context_length - len(state.ids)
    assert len(pipe.generate_from(state, max_new_tokens=min(left, 4), ignore_eos=True).result.token_ids) == min(left, 4)


def test_the_image_limit_is_the_clis_and_a_parameter(demo_ckpt, tmp_path):
    """The demo model's 112-pixel views once set a 4.8 Mpx limit: a 12 Mpx phone photo, which `sleigh run`
    takes, was refused by the API, whose remedy named a `max_pixels=` it did not have."""
    pipe = Pipeline.load(demo_ckpt, threads=1)
    assert pipe.contract.image.size * 4 <= 448  # views far smaller than InternVL's
    photo = tmp_path / "phone.jpg"
    Image.open(EXAMPLES / "coffee.jpg").convert("RGB").resize((4000, 3000)).save(photo)
    assert 4000 * 3000 < default_max_pixels()
    assert pipe.generate(photo, "hi", max_new_tokens=1).result.views >= 1
    with pytest.raises(SleighError, match="at most 11,999,999 pixels"):
        pipe.generate(photo, "hi", max_new_tokens=1, max_pixels=4000 * 3000 - 1).result
    with pytest.raises(SleighError, match="at most 11,999,999 pixels"):
        pipe.prefill(photo, "hi", max_pixels=4000 * 3000 - 1)
