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


def test_an_engine_for_a_checkpoint_is_refused_wherever_it_is_loaded(tiny_ckpt):
    """Only the CLI's run and eval refused it: the API, `evaluate` and `sleigh serve` ran the torch
    reference and reported the engine."""
    with pytest.raises(SleighError, match=r"^engine=int8 \| .* is a checkpoint"):
        Pipeline.load(tiny_ckpt, engine="int8")


def test_load_without_a_path():
    with pytest.raises(SleighError, match=r"^path \|"):
        Pipeline.load(None)


@pytest.mark.parametrize("kwargs, name", [
    ({"max_new_tokens": "5"}, "max_new_tokens"), ({"max_new_tokens": None}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"), ({"max_new_tokens": True}, "max_new_tokens"),
    ({"sampling": {"temperature": 1}}, "sampling"),
    ({"stop": None}, "stop"), ({"stop": [3]}, "stop"), ({"stop": ["ok", b"no"]}, "stop"),
    ({"stop": b"e"}, "stop \\| got bytes"), ({"stop": b""}, "stop \\| got bytes"),  # b"" was taken as no stops
    ({"stop": bytearray(b"e")}, "stop \\| got bytearray"),
    ({"prompt": None}, "prompt"), ({"prompt": 5}, "prompt"), ({"prompt": [("user", "hi")]}, "prompt"),
    ({"system": 5}, "system"), ({"max_tiles": "2"}, "max_tiles"), ({"max_tiles": 0}, "max_tiles"),
    ({"max_pixels": 0}, "max_pixels"),
])
def test_generate_arguments(pipe, kwargs, name):
    args = {"image": EXAMPLES / "coffee.jpg", "prompt": "hi", "max_new_tokens": 2, **kwargs}
    with pytest.raises(SleighError, match=rf"^{name}" if "|" in name else rf"^{name} \|"):
        pipe.generate(**args).result


def test_a_conversation_of_turns_is_still_a_prompt(pipe):
    text = pipe.generate(None, [Turn("user", "hi")], max_new_tokens=2, ignore_eos=True).result.token_ids
    assert text == pipe.generate(None, "hi", max_new_tokens=2, ignore_eos=True).result.token_ids


def test_a_str_stop_is_one_stop_string(pipe):
    """`stop="ue"` once stopped at any "u" or "e" (a str iterated as characters)."""
    free = pipe.generate(None, "Tell me a story", max_new_tokens=24, ignore_eos=True).result
    text = free.text
    # two characters the answer holds together, one of which it holds earlier alone: read as characters,
    # the stop would cut the answer there, before the pair
    pair = next((text[i:i + 2] for i in range(1, len(text) - 1)
                 if min(text.find(c) for c in text[i:i + 2]) < text.find(text[i:i + 2])), None)
    assert pair is not None, text
    one = pipe.generate(None, "Tell me a story", max_new_tokens=24, ignore_eos=True, stop=pair).result
    assert one.text == text[:text.index(pair)] and one.stop_reason == "stop"
    assert len(one.text) > min(text.find(c) for c in pair)  # not cut at a lone character
    listed = pipe.generate(None, "Tell me a story", max_new_tokens=24, ignore_eos=True, stop=[pair]).result
    assert listed.text == one.text


def test_a_finished_generation_keeps_its_result(pipe):
    gen = pipe.generate(None, "hi", max_new_tokens=3, ignore_eos=True)
    pieces = list(gen)
    result = gen.result
    assert "".join(pieces) == result.text
    assert list(gen) == [] and gen.result is result  # iterating again yields nothing and loses nothing


def test_a_failed_generation_fails_again_when_read_again(pipe):
    """Its second `.result` was None."""
    gen = pipe.generate(None, "hi", max_new_tokens=pipe.context_length)
    for _ in range(2):
        with pytest.raises(ContextExceeded):
            gen.result
    with pytest.raises(SleighError, match=r"^state \|"):
        pipe.generate_from(None)


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
    assert pipe.generate(photo, "hi", max_new_tokens=1, max_pixels=12_000_000).result.views >= 1
    with pytest.raises(SleighError, match="at most 11,999,999 pixels"):
        pipe.generate(photo, "hi", max_new_tokens=1, max_pixels=4000 * 3000 - 1).result
    with pytest.raises(SleighError, match="at most 11,999,999 pixels"):
        pipe.prefill(photo, "hi", max_pixels=4000 * 3000 - 1)


def test_the_api_and_the_cli_take_the_same_largest_image(pipe, monkeypatch, tmp_path):
    """A model of more tiles (export --max-tiles 40) once let the API take images the CLI refused: both
    use default_max_pixels(), whatever the model's grid."""
    from sleigh.runtime import image as image_mod

    photo = tmp_path / "p.png"
    Image.new("RGB", (300, 200)).save(photo)
    asked = []

    def limit(*args, **kwargs):  # the grid-based limit takes (max_tiles, size); the CLI's takes nothing
        asked.append((*args, *kwargs.values()))
        return 300 * 200 - 1

    monkeypatch.setattr(image_mod, "default_max_pixels", limit)
    monkeypatch.setattr("sleigh.runtime.pipeline.default_max_pixels", limit)
    with pytest.raises(SleighError, match="at most 59,999 pixels"):
        pipe.generate(photo, "hi", max_new_tokens=1).result
    assert asked == [()]
