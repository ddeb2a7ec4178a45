"""SentencePiece → tokenizers conversion against the InternVL2 oracle, and the tiny trained tokenizer."""

import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from sleigh.errors import SleighError
from sleigh.runtime.prompt import PromptTokenizer
from sleigh.sleighvl.tokenizer import (
    BYTE_TOKENS,
    INTERNLM2_SPECIALS,
    INTERNVL_SPECIALS,
    _TINY_CORPUS,
    convert_sentencepiece,
    train_tiny_tokenizer,
)
from tests.helpers import ORACLE, build_prompt

CKPT = ORACLE / "internvl2-tiny"
EXPECTED = json.loads((ORACLE / "expected.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def oracle_tok(tmp_path_factory) -> PromptTokenizer:
    """The converted oracle tokenizer, saved and reloaded as the runtime will load it."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    convert_sentencepiece(CKPT).save(str(path))
    return PromptTokenizer.from_file(path)


@pytest.mark.parametrize("probe", EXPECTED["tokenizer_probes"], ids=lambda p: repr(p["text"]))
def test_probe_ids_and_pieces(oracle_tok, probe):
    ids = oracle_tok.encode(probe["text"])
    assert ids == probe["input_ids"]
    assert [oracle_tok.tokenizer.id_to_token(i) for i in ids] == probe["pieces"]
    # No dummy prefix, no strip: decode gives the text back exactly, leading space included.
    assert oracle_tok.decode(ids) == probe["text"]


def test_astronaut_prompt_ids(oracle_tok):
    case = EXPECTED["astronaut"]
    prompt = build_prompt(case["question"], num_views=case["num_views"])
    ids = oracle_tok.encode(prompt)
    assert len(ids) == case["num_input_ids"] == 452
    assert ids == case["input_ids"]
    assert oracle_tok.encode_prompt(case["question"], case["num_views"]) == case["input_ids"]
    assert ids.count(oracle_tok.img_context_id) == case["num_image_tokens"]


def test_special_ids(oracle_tok):
    assert oracle_tok.img_context_id == EXPECTED["img_context_token_id"] == 502
    assert oracle_tok.im_end_id == EXPECTED["eos_token_id"] == 498
    assert (oracle_tok.bos_id, oracle_tok.eos_id) == (1, 2)
    assert oracle_tok.vocab_size == 509
    added = oracle_tok.tokenizer.get_added_tokens_decoder()
    config = json.loads((CKPT / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {i: (t.content, t.special) for i, t in added.items()} == {
        int(i): (t["content"], True) for i, t in config.items()}


def test_added_tokens_split_before_bpe(oracle_tok):
    # Each side of a special token is encoded alone: 'he' cannot merge across <|im_end|>.
    ids = oracle_tok.encode("h<|im_end|>e<img>", add_bos=False)
    assert [oracle_tok.tokenizer.id_to_token(i) for i in ids] == ["h", "<|im_end|>", "e", "<img>"]


def test_greedy_ids_decode(oracle_tok):
    case = EXPECTED["astronaut"]
    ids = case["greedy_12_no_eos_ids"]
    assert [oracle_tok.tokenizer.id_to_token(i) for i in ids] == case["greedy_12_no_eos_pieces"]
    # Pieces: <0xA1> al ▁care <0x2A> <0xC9> its ▁sm ▁and <0x54> c ▁old <0x2A>. A lone continuation byte
    # and a lead byte followed by ASCII are invalid UTF-8 (one U+FFFD each); valid bytes stay text.
    assert oracle_tok.decode(ids) == "\ufffdal care*\ufffdits sm andTc old*"
    stream = oracle_tok.stream()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == oracle_tok.decode(ids)


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyz THEAW    ..,?!\n\t0123456789é你好🎄ﬁ①　") + [
        "the", "care", "astronaut", "  ", " watches", "fully"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def _assert_matches_sentencepiece(model_dir: Path):
    tok = convert_sentencepiece(model_dir)
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    for text in _random_texts(1500):
        want = sp.encode(text)
        got = tok.encode(text, add_special_tokens=False).ids
        assert got == want, (text, sp.encode(text, out_type=str), tok.encode(text, add_special_tokens=False).tokens)
        assert tok.decode(got) == sp.decode(want), text


def test_matches_sentencepiece_on_random_text():
    _assert_matches_sentencepiece(CKPT)


@pytest.mark.parametrize("flags", [("add_dummy_prefix",), ("add_dummy_prefix", "remove_extra_whitespaces")])
def test_matches_sentencepiece_with_other_normalizer_flags(tmp_path, flags):
    shutil.copytree(CKPT, tmp_path, dirs_exist_ok=True)
    proto = spm_pb2.ModelProto()
    proto.ParseFromString((CKPT / "tokenizer.model").read_bytes())
    for flag in flags:
        setattr(proto.normalizer_spec, flag, True)
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    _assert_matches_sentencepiece(tmp_path)


def test_matches_sentencepiece_trained_with_nfkc(tmp_path):
    # SentencePiece's defaults: nmt_nfkc charsmap, dummy prefix, extra whitespace removed.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_TINY_CORPUS.splitlines()),
                                   model_prefix=str(tmp_path / "tokenizer"), model_type="bpe", vocab_size=400,
                                   byte_fallback=True, split_digits=True, minloglevel=2)
    _assert_matches_sentencepiece(tmp_path)


@pytest.mark.parametrize("content", [None, b"", b"this is not a protobuf", "truncate"])
def test_bad_tokenizer_model(tmp_path, content):
    shutil.copytree(CKPT, tmp_path, dirs_exist_ok=True)
    model = tmp_path / "tokenizer.model"
    if content is None:
        model.unlink()
    elif content == "truncate":
        model.write_bytes((CKPT / "tokenizer.model").read_bytes()[:3000])
    else:
        model.write_bytes(content)
    with pytest.raises(SleighError, match="tokenizer.model"):
        convert_sentencepiece(tmp_path)


def test_unigram_model_is_refused(tmp_path):
    shutil.copytree(CKPT, tmp_path, dirs_exist_ok=True)
    proto = spm_pb2.ModelProto()
    proto.ParseFromString((CKPT / "tokenizer.model").read_bytes())
    proto.trainer_spec.model_type = spm_pb2.TrainerSpec.UNIGRAM
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(SleighError, match="not BPE"):
        convert_sentencepiece(tmp_path)


def test_tiny_tokenizer_layout_and_round_trip():
    tok = train_tiny_tokenizer(1000)
    assert tok.get_vocab_size(with_added_tokens=True) == 1000
    assert [tok.id_to_token(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [tok.id_to_token(3 + b) for b in range(256)] == list(BYTE_TOKENS)
    specials = INTERNLM2_SPECIALS + INTERNVL_SPECIALS
    assert [tok.id_to_token(1000 - len(specials) + k) for k in range(len(specials))] == list(specials)

    ptok = PromptTokenizer(tok)
    text = "café naïve 你好 🎄 line1\nline2"
    ids = ptok.encode(text)
    assert ids[0] == ptok.bos_id
    assert any(tok.id_to_token(i) in BYTE_TOKENS for i in ids)  # é, 你, 🎄 go through bytes
    assert ptok.decode(ids) == tok.decode(ids) == text
    prompt_ids = ptok.encode_prompt("What is this?", num_views=1)
    assert prompt_ids.count(ptok.img_context_id) == 256


def test_tiny_tokenizer_is_deterministic():
    assert train_tiny_tokenizer(1000).to_str() == train_tiny_tokenizer(1000).to_str()
    assert train_tiny_tokenizer(600).to_str() != train_tiny_tokenizer(1000).to_str()


@pytest.mark.parametrize("size", [100, 100_000])
def test_tiny_tokenizer_size_out_of_range(size):
    with pytest.raises(SleighError, match="vocab_size"):
        train_tiny_tokenizer(size)
