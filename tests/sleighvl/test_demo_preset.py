"""The `demo` preset: small views and a tokenizer that knows the synthetic task's words."""

from __future__ import annotations

from sleigh.data.synth import ANSWERS, QUESTIONS
from sleigh.runtime.prompt import PromptTokenizer
from sleigh.sleighvl.config import PRESETS, SleighVLConfig
from tests.helpers import EXAMPLES


def test_config_round_trips_and_has_small_views(demo_ckpt):
    cfg = SleighVLConfig.load(demo_ckpt / "config.json")
    assert cfg.vision == PRESETS["demo"].vision and cfg.llm == PRESETS["demo"].llm
    assert (cfg.vision.image_size, cfg.vision.tokens_per_view, cfg.image.max_tiles) == (112, 16, 6)
    assert cfg.gswa is not None and cfg.gswa.apply == "attention"


def test_tokenizer_keeps_task_words_and_prompt_short(demo_ckpt):
    tok = PromptTokenizer.from_file(demo_ckpt / "tokenizer.json")
    assert tok.vocab_size <= PRESETS["demo"].llm.vocab_size
    for kind, answers in ANSWERS.items():
        for a in answers:
            ids = tok.encode(a, add_bos=False)
            assert tok.decode(ids) == a and len(ids) <= len(a.split()), (a, ids)
    for qs in QUESTIONS.values():
        for q in qs:
            text_ids = tok.encode_prompt(q, 0)
            assert tok.decode(text_ids, skip_special_tokens=False).endswith("assistant\n")
            assert len(text_ids) <= 40, len(text_ids)  # the default system message is a few pieces, not bytes


def test_the_shipped_demo_model_is_the_demo_preset(demo_ckpt):
    """examples/demo-ckpt/TRAINING.md trains it from `sleigh init --preset demo`: same shapes, same tokenizer."""
    shipped = SleighVLConfig.load(EXAMPLES / "demo-ckpt" / "config.json")
    assert shipped == SleighVLConfig.load(demo_ckpt / "config.json")
    assert (EXAMPLES / "demo-ckpt" / "tokenizer.json").read_bytes() == (demo_ckpt / "tokenizer.json").read_bytes()


def test_the_shipped_demo_model_answers_the_shipped_image():
    """examples/shapes.jpg shows an orange circle (its `sleigh data synth` labels); README's demo."""
    from sleigh.runtime.pipeline import Pipeline

    pipe = Pipeline.load(EXAMPLES / "demo-ckpt")
    result = pipe.generate(EXAMPLES / "shapes.jpg", "What colour is the coloured shape?", max_new_tokens=4).result
    assert result.text == "orange" and result.grid == (2, 1)
    assert max(result.gswa_weights[:2]) == result.gswa_weights[1]  # the circle is in the right-hand tile
