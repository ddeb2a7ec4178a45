"""The internlm2-chat prompt, the tokenizer around it, and a streaming detokenizer.

Imports only the standard library and `tokenizers` (never torch, transformers or onnx): the runtime
and the PyTorch reference share this one implementation of the template.

Decoding works on bytes: every id maps to the bytes it stands for ('▁' → b' ', '<0xNN>' → that byte,
other pieces → their UTF-8), and text is those bytes decoded as UTF-8 with U+FFFD for invalid bytes.
Nothing strips a leading space: InternLM2's SentencePiece model has no dummy prefix, so a leading '▁'
is a real space, and for a generated continuation it is the space between words either way.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tokenizers import Tokenizer

from sleigh.errors import SleighError, first_line
from sleigh.runtime.image import INTERNVL_PATCH, INTERNVL_TILE_SIZE
from sleigh.runtime.multimodal import tokens_per_view as view_tokens

# The internlm2-chat default system message as InternVL2 sets it.
DEFAULT_SYSTEM_MESSAGE = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
BOS, EOS = "<s>", "</s>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"  # where InternVL's chat() puts the image block when a question names it
TOKENS_PER_VIEW = view_tokens(INTERNVL_TILE_SIZE, INTERNVL_PATCH)  # InternVL2's 448x448 views of 14-px patches: 256
TEMPLATE = "internlm2-chat"

REQUIRED_TOKENS = (BOS, EOS, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT)


@dataclass(frozen=True)
class Turn:
    """One message of a conversation: `role` "user" or "assistant"; `image` marks the user turn the
    image belongs to (its block goes where the text says `<image>`, else before the text)."""

    role: str
    text: str
    image: bool = False


ROLES = ("user", "assistant")


def chat_parts(turns: Sequence[Turn], num_views: int = 0, *, system: str | None = None,
               tokens_per_view: int = TOKENS_PER_VIEW) -> list[tuple[str, bool]]:
    """The internlm2-chat template as (text, is_control) parts, in order.

    A control part is one special token that the template writes (`<|im_start|>`, `<img>`, ...); a
    text part is everything else: role headers and the caller's text, which the tokenizer may treat
    as plain text however it looks. Joined, the parts are the prompt string InternVL2's `chat()`
    builds (MPT separator style): system, then each turn, then the assistant header. With views and
    no turn marked `image`, the first user turn holds the image, as InternVL's `<image>` in the first
    question. `system=None` uses DEFAULT_SYSTEM_MESSAGE (a Pipeline passes its model's own, the
    manifest's `prompt.system_message`); `system=""` keeps an empty system block.
    """
    if num_views < 0:
        raise SleighError("num_views", f"{num_views} is negative", "0 (text only) or the number of image views")
    if tokens_per_view <= 0:
        raise SleighError("tokens_per_view", f"{tokens_per_view} is not positive", f"{TOKENS_PER_VIEW}")
    turns = list(turns)
    if not turns or turns[-1].role != "user":
        raise SleighError("messages", "the conversation does not end with a user turn",
                          "user and assistant turns, the last one from the user")
    for turn in turns:
        if turn.role not in ROLES:
            raise SleighError("messages", f"role {turn.role!r} is not supported", f"one of {list(ROLES)}")
    marked = [i for i, t in enumerate(turns) if t.image]
    if len(marked) > 1 or (marked and turns[marked[0]].role != "user"):
        raise SleighError("messages", "more than one turn, or a non-user turn, holds the image",
                          "one image, in a user turn")
    if marked and num_views == 0:
        raise SleighError("messages", "a turn is marked as holding the image but no image was given", "an image")
    image_turn = marked[0] if marked else next(i for i, t in enumerate(turns) if t.role == "user")
    system = DEFAULT_SYSTEM_MESSAGE if system is None else system
    parts: list[tuple[str, bool]] = [(IM_START, True), ("system\n" + system, False), (IM_END, True)]
    for i, turn in enumerate(turns):
        parts += [(IM_START, True), (turn.role + "\n", False)]
        if num_views > 0 and i == image_turn:
            before, placeholder, after = turn.text.partition(IMAGE_PLACEHOLDER)
            if not placeholder:
                before, after = "", "\n" + turn.text
            parts += [(before, False), (IMG_START, True), *[(IMG_CONTEXT, True)] * (tokens_per_view * num_views),
                      (IMG_END, True), (after, False)]
        else:
            parts.append((turn.text, False))
        parts.append((IM_END, True))
    parts += [(IM_START, True), ("assistant\n", False)]
    return _merge_text(parts)


def _merge_text(parts: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Adjacent text parts joined, empty ones dropped: each text part is what the tokenizer sees
    between two special tokens when it encodes the whole prompt string."""
    merged: list[tuple[str, bool]] = []
    for text, control in parts:
        if not control and merged and not merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, False)
        elif control or text:
            merged.append((text, control))
    return merged


def _plain_text_tokenizer(data: dict) -> Tokenizer:
    """A copy of the tokenizer `data` (its JSON, parsed) that encodes every added token's text as
    ordinary text: all added tokens marked special (tokenizers leaves non-special ones matched) and
    `encode_special_tokens` set."""
    plain = Tokenizer.from_str(json.dumps({**data, "added_tokens": [{**token, "special": True}
                                                                     for token in data.get("added_tokens", [])]}))
    plain.encode_special_tokens = True
    return plain


def _covers_every_character(data: dict) -> bool:
    """Whether every character of text becomes at least one token of at most the vocabulary's longest
    piece, for the tokenizer `data` (its JSON, parsed): a BPE or Unigram model with byte fallback
    (SentencePiece's, InternLM2's), or a byte-level pre-tokenizer (GPT-2's). Not so where unknown
    characters fuse into one unknown token."""
    model = data.get("model") or {}
    if model.get("type") in ("BPE", "Unigram") and model.get("byte_fallback"):
        return True
    return "ByteLevel" in json.dumps(data.get("pre_tokenizer"))


def _byte_value(piece: str) -> int | None:
    """255 for '<0xFF>': SentencePiece's byte-fallback pieces (the same test as tokenizers' ByteFallback)."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return int(piece[3:5], 16)
        except ValueError:
            return None
    return None


class PromptTokenizer:
    """A `tokenizers.Tokenizer` with the prompt's special ids and a byte-exact decode."""

    def __init__(self, tokenizer: Tokenizer, *, source: str = "tokenizer"):
        self.tokenizer = tokenizer
        self._source = source
        data = json.loads(tokenizer.to_str())  # parsed once, for both below
        self._plain = _plain_text_tokenizer(data)
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        missing = [t for t in REQUIRED_TOKENS if t not in vocab]
        if missing:
            raise SleighError(source, f"lacks the special tokens {missing}", f"a tokenizer with {list(REQUIRED_TOKENS)}")
        self._vocab = vocab
        # characters of normalized text one token covers at most, where every character is some token's
        # (byte fallback, or byte-level): a model that fuses unknown characters into one <unk> (or WordPiece's
        # [UNK] for a long word) covers any number, and no bound is drawn from the text (_covers_every_character)
        self._longest_piece = max(map(len, vocab)) if _covers_every_character(data) else None
        n = max(vocab.values()) + 1
        added = tokenizer.get_added_tokens_decoder()
        self._special = frozenset(i for i, t in added.items() if t.special)
        # The bytes each id stands for; added tokens are their literal text.
        self._bytes: list[bytes] = [b""] * n
        for piece, i in vocab.items():
            b = _byte_value(piece) if i not in added else None
            self._bytes[i] = bytes([b]) if b is not None else (
                piece if i in added else piece.replace("▁", " ")).encode("utf-8")

    @classmethod
    def from_file(cls, path: str | Path) -> PromptTokenizer:
        """Load a `tokenizer.json`."""
        path = Path(path)
        expected = "a tokenizers file (tokenizer.json) as `sleigh export` writes it"
        if not path.is_file():
            raise SleighError(str(path), "file not found", expected)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise SleighError(str(path), f"not a valid tokenizer file ({first_line(e, 200)})", expected) from None
        return cls(tok, source=str(path))

    # ids
    def token_to_id(self, token: str) -> int:
        i = self._vocab.get(token)
        if i is None:
            raise SleighError(self._source, f"has no token {token!r}", "a token of this tokenizer's vocabulary")
        return i

    @property
    def bos_id(self) -> int:
        return self._vocab[BOS]

    @property
    def eos_id(self) -> int:
        return self._vocab[EOS]

    @property
    def im_end_id(self) -> int:
        return self._vocab[IM_END]

    @property
    def img_context_id(self) -> int:
        return self._vocab[IMG_CONTEXT]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    # text <-> ids
    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Special tokens in `text` become their ids; BOS is prepended here, never by a post-processor."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_prompt(self, question: str, num_views: int = 0, system: str | None = None,
                      tokens_per_view: int = TOKENS_PER_VIEW, *, allow_special_tokens: bool = False) -> list[int]:
        """BOS + the internlm2-chat prompt's ids for one user turn (see `encode_chat`)."""
        return self.encode_chat([Turn("user", question, image=num_views > 0)], num_views, system=system,
                                tokens_per_view=tokens_per_view, allow_special_tokens=allow_special_tokens)

    def encode_chat(self, turns: Sequence[Turn], num_views: int = 0, *, system: str | None = None,
                    tokens_per_view: int = TOKENS_PER_VIEW, allow_special_tokens: bool = False) -> list[int]:
        """BOS + the internlm2-chat prompt's ids for a conversation (`chat_parts`).

        The caller's text (system, turns) is text: `<|im_end|>` or `</s>` typed in it is encoded as
        the characters it is, never as the control token, so user text cannot forge a turn. Only
        `allow_special_tokens=True` lets special tokens in text become their ids (trusted callers).
        For text without special tokens both give the ids of the whole prompt string encoded at once.
        """
        text_tokenizer = self.tokenizer if allow_special_tokens else self._plain
        ids = [self.bos_id]
        for text, control in chat_parts(turns, num_views, system=system, tokens_per_view=tokens_per_view):
            if control:
                ids.append(self._vocab[text])
            else:
                ids += text_tokenizer.encode(text, add_special_tokens=False).ids
        return ids

    def fewest_tokens(self, turns: Sequence[Turn], *, system: str | None = None) -> int:
        """At most `len(encode_chat(turns, 0, system=system))`, found without tokenizing: BOS, the
        template's control tokens, and each text part's characters that are not whitespace (after the
        normalizer) over the most one token covers. A text far past the context is refused from this
        (Pipeline.prepare) before tokenizing it, which holds the GIL for seconds at megabytes (a
        server's event loop with it: `/health` stalled 8 s on a 4 MB prompt)."""
        normalizer, n = self.tokenizer.normalizer, 1
        for text, control in chat_parts([replace(t, image=False) for t in turns], 0, system=system):
            if control:
                n += 1
                continue
            if self._longest_piece is None:  # no bound from the text (see __init__)
                continue
            text = normalizer.normalize_str(text) if normalizer is not None else text
            solid = len("".join(text.split())) - text.count("▁")  # pre-tokenizers may drop whitespace, or mark it ▁
            n += -(-solid // self._longest_piece)
        return n

    def token_bytes(self, token_id: int) -> bytes:
        """A model's vocabulary may be larger than its tokenizer's (padded embeddings): ids past the
        tokenizer decode to nothing, as in HF tokenizers."""
        if token_id < 0:
            raise SleighError("token id", f"{token_id} is negative", f"0..{len(self._bytes) - 1}")
        return self._bytes[token_id] if token_id < len(self._bytes) else b""

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        skip = self._special if skip_special_tokens else frozenset()
        data = b"".join(self.token_bytes(i) for i in ids if i not in skip)
        return data.decode("utf-8", errors="replace")

    def stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Turns generated ids into text as they come, never splitting a UTF-8 character.

    Byte-fallback pieces are held until they complete a character (an incremental UTF-8 decoder does
    the holding), so the concatenation of every `push` and the final `flush` equals `decode(all ids)`.
    O(1) per token.
    """

    def __init__(self, tokenizer: PromptTokenizer, *, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = tokenizer._special if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token ('' while a character is still partial)."""
        if token_id in self._skip:
            return ""
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held at the end (a truncated character becomes U+FFFD); the decoder starts afresh."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


def _prefix_function(s: str) -> list[int]:
    """For each k, the length of the longest proper prefix of s[:k + 1] that is also its suffix (KMP)."""
    pi = [0] * len(s)
    for i in range(1, len(s)):
        k = pi[i - 1]
        while k and s[i] != s[k]:
            k = pi[k - 1]
        pi[i] = k + (s[i] == s[k])
    return pi


class StopStrings:
    """Ends streamed text before the first stop string: `push` returns the text that is safe to show,
    holding back a tail that could still begin a stop string; `hit` is the stop string once seen.

    The pieces returned by `push` and `flush`, joined, are `text`: the input up to (not including)
    the first occurrence of any stop string, or all of it.

    The held tail is the longest end of the text that begins a stop string, followed through each
    piece's characters as in Knuth-Morris-Pratt: in time linear in the piece, where comparing every
    end of the tail with every beginning of a stop string took the stop's length squared a token (a
    long stop string whose beginning the text matched stalled the server). Whole stop strings are
    found by `str.find` over the held tail and the piece.
    """

    def __init__(self, stops: Iterable[str] | str):
        """`stops`: stop strings, or one (a str is one stop string, as OpenAI's `stop` takes it)."""
        wanted = "a string or a list of strings"
        if isinstance(stops, str):
            stops = (stops,)
        if isinstance(stops, (bytes, bytearray)) or not isinstance(stops, Iterable):  # bytes: iterable, as ints
            raise SleighError("stop", f"got {type(stops).__name__}", wanted)
        self.stops = tuple(stops)
        bad = next((s for s in self.stops if not isinstance(s, str)), "")
        if bad != "":
            raise SleighError("stop", f"holds {bad!r:.40} ({type(bad).__name__})", wanted)
        if any(not s for s in self.stops):
            raise SleighError("stop", "an empty stop string", "non-empty strings")
        self.hit: str | None = None
        self.text = ""
        self._held = ""
        self._fallback = [_prefix_function(s) for s in self.stops]
        self._matched = [0] * len(self.stops)  # per stop: the longest end of the text that begins it

    def push(self, piece: str) -> str:
        if self.hit is not None:
            return ""
        buf = self._held + piece
        found = [(buf.find(s), s) for s in self.stops if s in buf]
        if found:
            start, self.hit = min(found)
            out, self._held = buf[:start], ""
        else:  # no stop string in buf, so each one's match stays shorter than itself
            for i, (s, fallback) in enumerate(zip(self.stops, self._fallback)):
                k = self._matched[i]
                for c in piece:
                    while k and s[k] != c:
                        k = fallback[k - 1]
                    if s[k] == c:
                        k += 1
                self._matched[i] = k
            keep = max(self._matched, default=0)  # within buf: the held tail was the longest match before
            out, self._held = buf[:len(buf) - keep], buf[len(buf) - keep:]
        self.text += out
        return out

    def flush(self) -> str:
        """The held tail at the end of generation (no stop string completed it)."""
        out, self._held = self._held, ""
        self.text += out
        return out
