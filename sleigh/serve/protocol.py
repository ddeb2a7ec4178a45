"""The OpenAI chat-completions protocol: request parsing and checks, messages to the chat template's
turns, images from `data:` (or allowed `file://`) URLs, the error object, and the response shapes.

Everything a client can get wrong becomes an `APIError` (an HTTP status and one line), never a
traceback. The request is checked strictly (as OpenAI's API does): unknown fields, wrong types,
non-finite numbers and options this server cannot honour are refused, not ignored.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import socket
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Union
from urllib.parse import unquote, urlparse

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sleigh.errors import SleighError, first_line
from sleigh.runtime.image import load_image
from sleigh.runtime.pipeline import GenerationResult
from sleigh.runtime.prompt import Turn
from sleigh.runtime.sampling import SamplingOptions


class APIError(Exception):
    """An error answered with OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
             413: "invalid_request_error", 503: "service_unavailable_error", 500: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# -- the request ------------------------------------------------------------------------------------

class _Strict(BaseModel):
    # strict: "1" is not a number and true is not 1; NaN and Infinity are refused
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; tiling decides the resolution


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


def _without_nulls(data, empty: tuple[str, ...] = ()):
    """A JSON object with its null fields (and the `empty` ones that hold []) left out: clients send a
    parameter they do not use as null (the openai client sends `tools=None` so), and OpenAI's API
    takes null as "not given". A field this server does not know is still refused when it holds a value."""
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if not (v is None or k in empty and v == [])}
    return data


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Part]]
    name: str | None = None  # accepted, unused (the template has no speaker names)

    @model_validator(mode="before")
    @classmethod
    def _unused_fields_left_out(cls, data):  # a client's own reply sent back (message.model_dump()) holds
        return _without_nulls(data, empty=("tool_calls", "annotations"))  # refusal, tool_calls... as null


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default: sampling at 1; 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request
    user: str | None = None
    frequency_penalty: float = Field(0.0, ge=0, le=0)  # not implemented: only the neutral value
    presence_penalty: float = Field(0.0, ge=0, le=0)
    logprobs: Literal[False] = False
    # extensions (as vLLM names them)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    max_tiles: int | None = Field(None, ge=1)
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data):
        return _without_nulls(data)


MAX_STOP_STRINGS = 4  # OpenAI's limit


def parse_request(body: bytes) -> ChatRequest:
    """The request body (JSON) as a ChatRequest, or a 400 naming the first problem."""
    try:
        req = ChatRequest.model_validate_json(body)
    except ValidationError as e:
        message, param = _one_line(e)
        raise APIError(400, message, param=param) from None
    if req.stream_options is not None and not req.stream:  # as OpenAI's API answers it
        raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options")
    if req.stop is not None:
        stops = [req.stop] if isinstance(req.stop, str) else req.stop
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
    return req


PART_TAGS = ("text", "image_url")  # a content part's type, which pydantic puts in the location after its index


def _loc(loc) -> str:
    """A location as a dotted path. pydantic names union branches in it ('str', 'list[tagged-union[...]]')
    and a tagged part's type after its index (messages.0.content.0.text.text): neither is a field."""
    kept = []
    for i, p in enumerate(loc):
        if isinstance(p, str) and ("[" in p or p in ("str", "list")):
            continue
        if p in PART_TAGS and i and isinstance(loc[i - 1], int) and "content" in loc[:i]:
            continue
        kept.append(str(p))
    return ".".join(kept)


def _one_line(e: ValidationError) -> tuple[str, str | None]:
    """(the deepest problem (in a union, the branch that got furthest) in one line, its field's path)."""
    errors = e.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"the body is not valid JSON ({first['ctx']['error']})", None
    if not first["loc"]:
        return f"the body must be a JSON object ({first['msg']})", None
    deepest = max(len(_loc(err["loc"]).split(".")) for err in errors)
    chosen = [err for err in errors if len(_loc(err["loc"]).split(".")) == deepest]
    where = _loc(chosen[0]["loc"])
    if chosen[0]["type"] == "extra_forbidden":
        return f"Unrecognized request argument supplied: {where}", where
    messages = dict.fromkeys(err["msg"] for err in chosen if _loc(err["loc"]) == where)
    return f"{where}: {' | '.join(messages)}", where


# -- messages -> the chat template's turns ----------------------------------------------------------

@dataclass(frozen=True)
class Conversation:
    system: str | None  # None: the model's default system message
    turns: list[Turn]
    image_url: str | None
    image_param: str | None  # where the image came from, for errors


def to_conversation(req: ChatRequest) -> Conversation:
    """System messages (first, joined), then user/assistant turns ending with a user turn; at most one
    image, in a user message (the runtime places one image per request)."""
    system_texts: list[str] = []
    turns: list[Turn] = []
    image_url = image_param = None
    for i, msg in enumerate(req.messages):
        where = f"messages.{i}"
        texts, images = _split_content(msg.content)
        if msg.role in ("system", "developer"):
            if turns:
                raise APIError(400, f"{where}: a system message after the conversation started; "
                                    "put system messages first", param=where)
            if images:
                raise APIError(400, f"{where}: a system message cannot hold an image", param=where)
            system_texts.append("\n".join(texts))
            continue
        if images and msg.role != "user":
            raise APIError(400, f"{where}: only user messages can hold an image", param=where)
        if len(images) + (image_url is not None) > 1:
            raise APIError(400, f"{where}: more than one image in the request; this model takes one image "
                                "per request", param=where)
        if images:
            (j, image_url), = images
            image_param = f"{where}.content.{j}.image_url"
        turns.append(Turn(msg.role, "\n".join(texts), image=bool(images)))
    if not turns or turns[-1].role != "user":
        raise APIError(400, "messages: the last message must be from the user", param="messages")
    return Conversation("\n".join(system_texts) if system_texts else None, turns, image_url, image_param)


def _split_content(content) -> tuple[list[str], list[tuple[int, str]]]:
    if isinstance(content, str):
        return [content], []
    texts = [p.text for p in content if isinstance(p, TextPart)]
    images = [(j, p.image_url.url) for j, p in enumerate(content) if isinstance(p, ImagePart)]
    return texts, images


def sampling_options(req: ChatRequest) -> SamplingOptions:
    try:
        return SamplingOptions(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                               repetition_penalty=req.repetition_penalty, seed=req.seed)
    except SleighError as e:
        raise APIError(400, str(e)) from None


def stop_strings(req: ChatRequest) -> tuple[str, ...]:
    if req.stop is None:
        return ()
    return (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)


def max_new_tokens(req: ChatRequest, default: int) -> tuple[int, bool]:
    """(the answer's token limit, whether the request named it). A limit it does not name is the
    server's default, cut to what the context leaves after the prompt (Pipeline.generate's
    fit_context), as OpenAI's API does: only a limit asked for is refused where it does not fit."""
    asked = req.max_completion_tokens or req.max_tokens
    return (asked, True) if asked else (default, False)


# -- images -----------------------------------------------------------------------------------------

# The raster formats a client's image may come in (those this Pillow has: AVIF since Pillow 11.2). Pillow
# reads more (EPS through Ghostscript, PDF, ...): an untrusted request never reaches those decoders.
Image.init()
IMAGE_FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "AVIF", "GIF", "BMP", "DIB", "TIFF", "ICO", "PPM", "TGA")
                      if f in Image.OPEN)


def decode_image(url: str, param: str, *, max_pixels: int, local_root: Path | None) -> Image.Image:
    """A `data:image/...;base64,` URL (or, with `local_root`, a `file://` path inside it) as a decoded
    RGB image. The pixel limit is checked on the header, before decoding."""
    if url[:5].lower() == "data:":
        header, comma, data = url.partition(",")
        header = header.lower()  # RFC 2397: the scheme, the media type and "base64" are case-insensitive
        if not comma or not header.startswith("data:image/") or not header.endswith(";base64"):
            raise APIError(400, f"{param}: expected data:image/<format>;base64,<data>", param=param)
        data = "".join(data.split())  # MIME base64 wraps its lines (`base64 FILE` without -w0)
        try:
            raw = base64.b64decode(data + "=" * (-len(data) % 4), validate=True)  # and the padding may be left off
        except (binascii.Error, ValueError):
            raise APIError(400, f"{param}: the base64 data does not decode", param=param) from None
        source, what = io.BytesIO(raw), "the image"
    elif url.startswith("file://"):
        if local_root is None:
            raise APIError(400, f"{param}: file:// URLs are refused (the server was started without "
                                "--allow-local-files); send the image as a data: URL", param=param)
        try:  # a symlink loop, a name too long, a NUL: the path's fault, not the server's
            path = Path(unquote(urlparse(url).path)).resolve()
            if not path.is_relative_to(local_root.resolve()):  # before anything else is asked of the path
                raise APIError(400, f"{param}: {path} is outside the allowed folder", param=param)
            is_file = path.is_file()
        except (OSError, ValueError, RuntimeError) as e:
            raise APIError(400, f"{param}: not a usable file path ({getattr(e, 'strerror', None) or first_line(e)})",
                           param=param) from None
        if not is_file:
            raise APIError(400, f"{param}: {path} is not a file", param=param)
        source, what = path, str(path)
    elif url.startswith(("http://", "https://")):
        raise APIError(400, f"{param}: the server does not fetch URLs; send the image as a data: URL", param=param)
    else:
        raise APIError(400, f"{param}: expected a data:image/...;base64 URL", param=param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source, formats=IMAGE_FORMATS)
        width, height = opened.size
    except Image.DecompressionBombError:
        raise APIError(400, f"{param}: {what} has more than {max_pixels:,} pixels", param=param) from None
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError... on bad data
        raise APIError(400, f"{param}: {what} is not an image in a format this server reads "
                            f"({', '.join(IMAGE_FORMATS)}; {type(e).__name__})", param=param) from None
    if width * height > max_pixels:
        raise APIError(400, f"{param}: {what} is {width}x{height} = {width * height:,} pixels; the limit is "
                            f"{max_pixels:,} (--max-image-pixels)", param=param)
    try:
        return load_image(opened)
    except SleighError as e:
        raise APIError(400, f"{param}: {what} does not decode ({e.problem})", param=param) from None


# -- responses --------------------------------------------------------------------------------------

def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def sleigh_fields(result: GenerationResult) -> dict:
    """The extra `sleigh` field of a response (clients ignore it): GSWA's tile weights and grid."""
    return {"gswa_weights": result.gswa_weights, "grid": list(result.grid) if result.grid else None,
            "views": result.views, "token_ids": result.token_ids, "backend": result.backend,
            "timings": vars(result.timings), "replica": f"{socket.gethostname()}:{os.getpid()}"}


def usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids),
            "total_tokens": result.prompt_tokens + len(result.token_ids)}


def completion(cid: str, model: str, result: GenerationResult) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.stop_reason, "logprobs": None}],
            "usage": usage(result), "sleigh": sleigh_fields(result)}


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, **extra) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}
