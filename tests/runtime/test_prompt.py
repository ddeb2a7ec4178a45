"""The internlm2-chat template, PromptTokenizer and StreamDecoder (runtime side: tokenizers only)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

from sleigh.errors import SleighError
from sleigh.runtime.prompt import (
    DEFAULT_SYSTEM_MESSAGE,
    IMG_CONTEXT,
    TOKENS_PER_VIEW,
    PromptTokenizer,
    build_prompt,
)

ORACLE = Path(__file__).parents[1] / "fixtures" / "oracle"
EXPECTED = json.loads((ORACLE / "expected.json").read_text(encoding="utf-8"))
SPECIALS = ["<|im_end|>", "<|im_start|>", "<img>", "</img>", "<IMG_CONTEXT>"]


def small_tokenizer(specials=SPECIALS) -> Tokenizer:
    """A hand-made SentencePiece-style BPE: <unk> <s> </s>, 256 byte pieces, a few letters, then specials."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "▁w", "▁wor", "or"]
    merges = [("h", "e"), ("l", "l"), ("▁", "w"), ("o", "r"), ("▁w", "or")]
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ["<unk>", "<s>", "</s>", *specials]])
    return tok


@pytest.fixture()
def ptok() -> PromptTokenizer:
    return PromptTokenizer(small_tokenizer())


def test_default_system_message():
    assert DEFAULT_SYSTEM_MESSAGE == EXPECTED["system_message"]


def test_prompt_equals_oracle():
    case = EXPECTED["astronaut"]
    assert build_prompt(case["question"], num_views=case["num_views"]) == case["prompt"]
    assert build_prompt(case["question"], 1, system=DEFAULT_SYSTEM_MESSAGE) == case["prompt"]


def test_text_only_prompt():
    prompt = build_prompt("Hi?", system="Be brief.")
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nHi?<|im_end|><|im_start|>assistant\n"
    assert "<img>" not in build_prompt("Hi?") and IMG_CONTEXT not in build_prompt("Hi?")


def test_empty_system_keeps_an_empty_block():
    assert build_prompt("Q", system="").startswith("<|im_start|>system\n<|im_end|><|im_start|>user\nQ")


def test_views_and_image_placeholder():
    prompt = build_prompt("Q", num_views=3, tokens_per_view=4)
    assert "user\n<img>" + IMG_CONTEXT * 12 + "</img>\nQ<|im_end|>" in prompt
    assert build_prompt("Q", num_views=2).count(IMG_CONTEXT) == 2 * TOKENS_PER_VIEW
    # InternVL's chat(): an explicit <image> in the question says where the block goes.
    prompt = build_prompt("Look: <image> what is it?", num_views=1, tokens_per_view=2)
    assert "user\nLook: <img>" + IMG_CONTEXT * 2 + "</img> what is it?<|im_end|>" in prompt


def test_negative_views_is_a_user_error():
    with pytest.raises(SleighError, match="num_views"):
        build_prompt("Q", num_views=-1)


def test_ids_and_encode(ptok):
    assert (ptok.bos_id, ptok.eos_id) == (1, 2)
    assert ptok.stop_ids == (ptok.token_to_id("<|im_end|>"), 2)
    assert ptok.img_context_id == ptok.token_to_id("<IMG_CONTEXT>") == ptok.vocab_size - 1
    assert ptok.encode("hello", add_bos=False) == [ptok.token_to_id(p) for p in ["he", "ll", "o"]]
    assert ptok.encode("hello")[0] == ptok.bos_id
    ids = ptok.encode_prompt("hello", num_views=1)
    assert ids.count(ptok.img_context_id) == TOKENS_PER_VIEW
    assert ptok.decode(ids) == "system\n" + DEFAULT_SYSTEM_MESSAGE + "user\n\nhelloassistant\n"
    with pytest.raises(SleighError, match="no token"):
        ptok.token_to_id("<nope>")


MIXED = " héllo wörld 你好 🎄\n"  # 2-, 3- and 4-byte characters through byte fallback


def test_stream_decoder_matches_decode(ptok):
    ids = ptok.encode(MIXED) + [ptok.im_end_id]
    assert sum(ptok.tokenizer.id_to_token(i).startswith("<0x") for i in ids) >= 4 + 6 + 4
    stream = ptok.stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == ptok.decode(ids) == MIXED
    assert pieces.count("") >= 10  # partial characters were held back, not emitted broken
    assert ptok.decode(ids) == ptok.tokenizer.decode(ids)  # same text as the tokenizers decoder


def test_stream_decoder_invalid_and_truncated_bytes(ptok):
    byte = lambda b: ptok.token_to_id(f"<0x{b:02X}>")  # noqa: E731
    # lone continuation byte, lead byte cut by ASCII, a special in the middle, a truncated 4-byte char
    ids = [byte(0xA1), ptok.token_to_id("he"), byte(0xC9), ptok.token_to_id("o"), byte(0xE4), ptok.im_end_id,
           byte(0xBD), byte(0xA0), byte(0xF0), byte(0x9F)]
    stream = ptok.stream()
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == ptok.decode(ids) == "\ufffdhe\ufffdo你\ufffd"
    stream = ptok.stream(skip_special_tokens=False)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == ptok.decode(ids, skip_special_tokens=False)


def test_from_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    small_tokenizer().save(str(path))
    assert PromptTokenizer.from_file(path).encode("hello") == PromptTokenizer(small_tokenizer()).encode("hello")


def test_from_file_missing(tmp_path):
    with pytest.raises(SleighError, match="not found"):
        PromptTokenizer.from_file(tmp_path / "tokenizer.json")


def test_from_file_invalid(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{not json")
    with pytest.raises(SleighError, match="not a valid tokenizer"):
        PromptTokenizer.from_file(path)


def test_tokenizer_without_image_tokens_is_refused():
    with pytest.raises(SleighError, match="IMG_CONTEXT"):
        PromptTokenizer(small_tokenizer(specials=["<|im_end|>", "<|im_start|>"]))


def test_import_loads_no_heavy_packages():
    code = ("import sys, sleigh.runtime.prompt; "
            "print(','.join(m for m in ('torch', 'transformers', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
