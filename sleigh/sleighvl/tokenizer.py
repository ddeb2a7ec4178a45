"""Tokenizers for SleighVL: InternLM2's SentencePiece model converted to `tokenizers`, and a tiny trained one.

The runtime only ever sees the `tokenizers` file (`tokenizer.json`); this module makes it, either by
converting a checkpoint's `tokenizer.model` (`convert_sentencepiece`) or by training a small
byte-fallback BPE for random test checkpoints (`train_tiny_tokenizer`). Both produce the same pipeline,
so one runtime code path (`sleigh.runtime.prompt`) serves both:

    text ─split out added tokens─► each remaining piece alone:
        [charsmap] → [strip/collapse spaces] → ' '→'▁' → [prepend '▁'] → BPE (byte fallback)
    ids ─► '▁'→' ' → <0xNN> bytes → fuse [→ strip one leading ' ' only for dummy-prefix models]

InternLM2's tokenizer is a slow SentencePiece BPE with byte fallback and no dummy prefix
(`normalizer_spec.add_dummy_prefix` is false): 'Hello' → 'H','e','ll','o' and ' leading' → '▁l',...
The InternLM2Tokenizer splits special/added tokens out first and runs SentencePiece on each remaining
piece alone; `tokenizers` does the same with special added tokens that are not normalized.
No post-processor adds BOS: the prompt code adds it explicitly.

Reads the model proto with the protobuf classes that ship with `sentencepiece`; never runs the
checkpoint's remote code.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from sleigh.errors import SleighError
from sleigh.runtime.package import read_json

SPIECE_UNDERLINE = "▁"
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
# InternLM2's chat tokens then InternVL's image/grounding tokens, in the order of their ids in InternVL2
# (the first six end the SentencePiece vocab, the other nine are added after it).
INTERNLM2_SPECIALS = (
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
)
INTERNVL_SPECIALS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))

# sentencepiece_model.proto enums
_SPM_BPE = 2
_PIECE_NORMAL, _PIECE_UNKNOWN, _PIECE_CONTROL, _PIECE_USER_DEFINED, _PIECE_BYTE = 1, 2, 3, 4, 6


def convert_sentencepiece(src_dir: Path) -> Tokenizer:
    """Convert a checkpoint's `tokenizer.model` (+ its added tokens) to an equivalent `tokenizers.Tokenizer`."""
    src_dir = Path(src_dir)
    proto = _load_spm_proto(src_dir / "tokenizer.model")
    norm, trainer = proto.normalizer_spec, proto.trainer_spec

    vocab: dict[str, int] = {}
    mergeable: dict[str, float] = {}  # NORMAL pieces: the only ones BPE may build or merge from
    user_defined: dict[int, str] = {}
    for i, piece in enumerate(proto.pieces):
        if piece.piece in vocab:
            raise SleighError(str(src_dir / "tokenizer.model"), f"piece {piece.piece!r} appears twice",
                              "a valid SentencePiece model")
        vocab[piece.piece] = i
        if piece.type == _PIECE_NORMAL:
            mergeable[piece.piece] = piece.score
        elif piece.type == _PIECE_USER_DEFINED:
            user_defined[i] = piece.piece
    if trainer.byte_fallback:
        missing = [b for b in BYTE_TOKENS if b not in vocab]
        if missing:
            raise SleighError(str(src_dir / "tokenizer.model"), f"byte_fallback is set but {len(missing)} byte "
                              f"pieces are missing (first {missing[0]})", "all 256 <0xNN> pieces")

    added = _read_added_tokens(src_dir, user_defined)
    # InternLM2's converter gives an added token's id to its content even where the proto's piece differs.
    id_to_piece = {i: p for p, i in vocab.items()}
    for i, (content, _special) in added.items():
        if i < len(proto.pieces) and id_to_piece[i] != content:
            del vocab[id_to_piece[i]]
            mergeable.pop(id_to_piece[i], None)
            vocab[content] = i

    unk_piece = trainer.unk_piece or UNK
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges_from_scores(mergeable), unk_token=unk_piece,
                               fuse_unk=True, byte_fallback=bool(trainer.byte_fallback)))
    tok.normalizer = _spm_normalizer(norm)
    tok.pre_tokenizer = None  # SentencePiece BPE merges over the whole piece; no word splitting
    tok.decoder = _decoder(strip_dummy_prefix=norm.add_dummy_prefix)

    # Added ids after the proto's pieces must be contiguous: `tokenizers` appends them in order.
    for i in sorted(added):
        content, special = added[i]
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
        got = tok.token_to_id(content)
        if got != i:
            raise SleighError(str(src_dir), f"added token {content!r} has id {i} but would get id {got}",
                              "added token ids contiguous after the SentencePiece vocab")
    return tok


def _load_spm_proto(path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    except ImportError:  # transformers bundles the same generated classes
        from transformers.utils import sentencepiece_model_pb2_new as spm_pb2
    from google.protobuf.message import DecodeError

    expected = "a SentencePiece BPE model (tokenizer.model) as InternLM2 checkpoints carry"
    if not path.is_file():
        raise SleighError(str(path), "file not found", expected)
    proto = spm_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except (DecodeError, ValueError, RuntimeError) as e:  # RuntimeError: upb's parse failure
        raise SleighError(str(path), f"not a valid SentencePiece model ({e})", expected) from None
    # Protobuf parses many byte strings "successfully" into nonsense: check what a real model has.
    if len(proto.pieces) < 3 or not proto.HasField("trainer_spec"):
        raise SleighError(str(path), f"not a valid SentencePiece model ({len(proto.pieces)} pieces)", expected)
    if proto.trainer_spec.model_type != _SPM_BPE:
        raise SleighError(str(path), f"SentencePiece model type {proto.trainer_spec.model_type} is not BPE",
                          expected)
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise SleighError(str(path), "treat_whitespace_as_suffix is not supported", expected)
    return proto


def _read_added_tokens(src_dir: Path, user_defined: dict[int, str]) -> dict[int, tuple[str, bool]]:
    """id -> (content, special): tokenizer_config.json's added_tokens_decoder, then added_tokens.json,
    then the proto's user-defined pieces (SentencePiece itself never splits those)."""
    added: dict[int, tuple[str, bool]] = {}
    cfg_path, extra_path = src_dir / "tokenizer_config.json", src_dir / "added_tokens.json"
    if cfg_path.is_file():
        cfg = read_json(cfg_path, "a tokenizer_config.json")
        try:
            for i, spec in cfg.get("added_tokens_decoder", {}).items():
                added[int(i)] = (spec["content"], bool(spec.get("special", True)))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SleighError(str(cfg_path), f"unreadable added_tokens_decoder ({e})",
                              "a JSON object of id -> {content, special}") from None
    if extra_path.is_file():
        try:
            for content, i in read_json(extra_path, "a JSON object of token -> id").items():
                added.setdefault(int(i), (str(content), True))
        except (ValueError, TypeError) as e:
            raise SleighError(str(extra_path), f"unreadable ({e})", "a JSON object of token -> id") from None
    for i, content in user_defined.items():
        added.setdefault(i, (content, False))
    contents = [c for c, _ in added.values()]
    if len(set(contents)) != len(contents):
        raise SleighError(str(src_dir), "an added token is listed under two ids", "one id per added token")
    return added


def _merges_from_scores(scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's rule "merge the adjacent pair whose union has the best score".

    Every split of a piece into two pieces becomes a merge ranked by the piece's score (best first),
    ties by the lengths of the parts, as transformers' SentencePieceExtractor does.
    """
    merges = []
    for piece, score in scores.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in scores and right in scores:
                merges.append((-score, len(left), len(right), left, right))
    merges.sort(key=lambda m: m[:3])
    return [(left, right) for _, _, _, left, right in merges]


def _spm_normalizer(norm) -> normalizers.Normalizer:
    """SentencePiece's normalizer: charsmap, extra-space removal, ' '→'▁', dummy prefix (in that order)."""
    steps: list[normalizers.Normalizer] = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(r" {2,}"), " ")]
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPIECE_UNDERLINE))
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPIECE_UNDERLINE))
    return normalizers.Sequence(steps)


def _decoder(strip_dummy_prefix: bool) -> decoders.Decoder:
    # No strip for InternLM2 (no dummy prefix): decode(encode(t)) == t, leading spaces included.
    # A dummy-prefix model strips one, as SentencePiece's own decode does.
    steps = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if strip_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return decoders.Sequence(steps)


# ---------------------------------------------------------------------------------------------------
# A tiny trained tokenizer for random checkpoints (`sleigh init`)

_TINY_CORPUS = """\
An astronaut in a white suit floats beside the open hatch of a small space station. Behind her, the
curve of the Earth glows blue and white, and a thin line of sunrise runs along the edge of the planet.
She holds a camera in one gloved hand and a safety tether in the other. The picture was taken from a
window on the far side of the station, so the solar panels frame the scene like the wings of a bird.

A red fox walks quietly across a snowy field at the edge of a forest. The trees are tall and dark,
their branches heavy with fresh snow. The fox stops, turns its head towards the camera, and watches
for a moment before it jumps into the deep snow to catch a mouse. Its tracks make a long, curved line
that leads back to a wooden fence near an old farmhouse with a green door and two small windows.

In a busy kitchen, a young chef chops onions, carrots and peppers on a wooden board. A large pot of
soup is boiling on the stove, and steam rises towards the ceiling. On the counter there are bowls of
rice, a basket of bread, three lemons and a bottle of olive oil. A teacher and her students watch
carefully as the chef explains how to hold the knife, how to keep the fingers safe, and why the pieces
should all be the same size so that they cook evenly.

The city street is crowded with people, bicycles and yellow taxis. Tall buildings of glass and steel
reflect the evening light, and the signs of shops and restaurants begin to shine in many colours. A
man in a blue coat waits at the crossing with a small dog on a lead. A woman carries an umbrella,
although the sky is clear. Somewhere a street musician plays the violin, and a child drops a coin
into the open case at his feet.

Describe the image in detail. What is the person doing? How many animals can you see, and where are
they? Which objects are on the table, and what colour is the largest one? Is it day or night? Read
the text on the sign and explain what it means. Count the windows of the house. Is there anything
unusual in this picture? Answer the question with a short sentence, then give the reasons for your
answer step by step.

A chart shows the number of visitors to a museum in each month of the year. The values rise from
about four thousand in January to more than twelve thousand in August, then fall again in the autumn.
The highest bar is coloured orange and the others are grey. Below the chart, a small table lists the
exact numbers, and a note explains that the museum was closed for two weeks in March for repairs.

On a quiet beach at sunset, two friends sit on a blanket and share a picnic of sandwiches, fruit and
cold lemonade. The waves are gentle, the sand is warm, and a few seagulls walk along the water looking
for food. Far away, a sailing boat moves slowly towards the harbour, where the lights of the village
are starting to appear one by one.
"""

# Training-only word split, SentencePiece style: a word keeps its leading '▁'; digits stand alone
# (split_digits); punctuation runs and newlines are their own words. The finished tokenizer has no
# pre-tokenizer (like the converted one), which is equivalent because no learned merge crosses these.
_TRAIN_SPLIT = r"▁?\p{L}+|▁?[^\p{L}\p{N}\s▁]+|\p{N}|\s|▁"
# Every printable ASCII character (space is '▁') gets a piece even if the corpus lacks it.
_TINY_ALPHABET = [chr(c) for c in range(33, 127)] + [SPIECE_UNDERLINE, "\n"]


def train_tiny_tokenizer(vocab_size: int = 1000, *, corpus: str | None = None) -> Tokenizer:
    """Train a deterministic byte-fallback BPE laid out like InternLM2's tokenizer, `vocab_size` ids in all.

    Ids: <unk>=0, <s>=1, </s>=2, the 256 <0xNN> bytes, the learned pieces, then the 15 InternLM2/InternVL
    special tokens (in InternVL2's order). Any unicode text round-trips through the byte pieces.
    """
    corpus = _TINY_CORPUS if corpus is None else corpus
    fixed = 3 + len(BYTE_TOKENS) + len(INTERNLM2_SPECIALS) + len(INTERNVL_SPECIALS)
    n_learned = vocab_size - fixed
    if n_learned < len(_TINY_ALPHABET):
        raise SleighError("vocab_size", f"{vocab_size} is too small",
                          f"at least {fixed + len(_TINY_ALPHABET)} (specials, bytes and the ASCII alphabet)")

    trainee = Tokenizer(models.BPE())
    trainee.normalizer = normalizers.Replace(" ", SPIECE_UNDERLINE)
    trainee.pre_tokenizer = pre_tokenizers.Split(Regex(_TRAIN_SPLIT), behavior="isolated")
    trainer = trainers.BpeTrainer(vocab_size=n_learned, show_progress=False, special_tokens=[],
                                  initial_alphabet=_TINY_ALPHABET, min_frequency=0)
    trainee.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    learned = json.loads(trainee.to_str())["model"]
    if len(learned["vocab"]) < n_learned:
        raise SleighError("vocab_size", f"{vocab_size} needs {n_learned} learned pieces but the corpus gives "
                          f"only {len(learned['vocab'])}", f"at most {fixed + len(learned['vocab'])}")

    vocab = {t: i for i, t in enumerate((UNK, BOS, EOS) + BYTE_TOKENS)}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab[piece] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(" ", SPIECE_UNDERLINE)])
    tok.pre_tokenizer = None
    tok.decoder = _decoder(strip_dummy_prefix=False)
    tok.add_tokens([AddedToken(t, special=True, normalized=False)
                    for t in (UNK, BOS, EOS) + INTERNLM2_SPECIALS + INTERNVL_SPECIALS])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size, "layout arithmetic is off"
    return tok
