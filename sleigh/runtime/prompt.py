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
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer

from sleigh.errors import SleighError, first_line

# The internlm2-chat default system message as InternVL2 sets it.
DEFAULT_SYSTEM_MESSAGE = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
BOS, EOS = "<s>", "</s>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"  # where InternVL's chat() puts the image block when a question names it
TOKENS_PER_VIEW = 256  # 1024 patches of a 448x448 view after pixel shuffle 0.5
TEMPLATE = "internlm2-chat"

REQUIRED_TOKENS = (BOS, EOS, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT)


def image_block(num_views: int, tokens_per_view: int = TOKENS_PER_VIEW) -> str:
    """`<img>` + `<IMG_CONTEXT>`×(tokens_per_view·num_views) + `</img>`: one slot per image embedding row."""
    return IMG_START + IMG_CONTEXT * (tokens_per_view * num_views) + IMG_END


def build_prompt(question: str, num_views: int = 0, *, system: str | None = None,
                 tokens_per_view: int = TOKENS_PER_VIEW) -> str:
    """The internlm2-chat prompt for one user turn, exactly as InternVL2's `chat()` builds it.

    With views, the image block goes where the question says `<image>` (first one), else on its own
    line before the question. `system=None` uses DEFAULT_SYSTEM_MESSAGE; `system=""` keeps an empty
    system block (`<|im_start|>system\\n<|im_end|>`), which is what InternVL's template renders too.
    """
    if num_views < 0:
        raise SleighError("num_views", f"{num_views} is negative", "0 (text only) or the number of image views")
    if tokens_per_view <= 0:
        raise SleighError("tokens_per_view", f"{tokens_per_view} is not positive", f"{TOKENS_PER_VIEW}")
    system = DEFAULT_SYSTEM_MESSAGE if system is None else system
    if num_views > 0:
        if IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        question = question.replace(IMAGE_PLACEHOLDER, image_block(num_views, tokens_per_view), 1)
    return (f"{IM_START}system\n{system}{IM_END}"
            f"{IM_START}user\n{question}{IM_END}"
            f"{IM_START}assistant\n")


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
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        missing = [t for t in REQUIRED_TOKENS if t not in vocab]
        if missing:
            raise SleighError(source, f"lacks the special tokens {missing}", f"a tokenizer with {list(REQUIRED_TOKENS)}")
        self._vocab = vocab
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
    def stop_ids(self) -> tuple[int, ...]:
        """Generation stops on `<|im_end|>` (what the chat model emits) or `</s>`."""
        return (self.im_end_id, self.eos_id)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    # text <-> ids
    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Special tokens in `text` become their ids; BOS is prepended here, never by a post-processor."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_prompt(self, question: str, num_views: int = 0, system: str | None = None,
                      tokens_per_view: int = TOKENS_PER_VIEW) -> list[int]:
        """BOS + the internlm2-chat prompt's ids."""
        return self.encode(build_prompt(question, num_views, system=system, tokens_per_view=tokens_per_view))

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
