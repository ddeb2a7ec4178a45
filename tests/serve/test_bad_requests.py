"""Malformed and unservable requests, as raw HTTP: each gets OpenAI's error object with a 4xx status
and a one-line message, never a traceback, and the server keeps answering."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from sleigh.serve.protocol import IMAGE_FORMATS
from tests.serve.conftest import MAX_BODY_MB, MAX_IMAGE_PIXELS, data_url, png_bytes

TEXT = {"role": "user", "content": "Hi"}


def img(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def body(**kw) -> dict:
    return {"model": "MODEL", "messages": [TEXT], "max_tokens": 2, **kw}


SMALL = data_url(png_bytes(32, 32))
SIDE = int(MAX_IMAGE_PIXELS ** 0.5) + 1  # just past the server's pixel limit


def flat_png(width: int, height: int) -> bytes:
    """One colour: a few KB however many pixels, so only the pixel limit can refuse it."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()

# (id, request body (dict, or raw bytes/str), status, words the message must contain)
CASES = [
    ("not-json", b"{not json", 400, "not valid JSON"),
    ("empty-body", b"", 400, "not valid JSON"),
    ("not-utf8", b"\xff\xfe{", 400, "JSON"),
    ("json-array", b"[1, 2]", 400, "JSON object"),
    ("json-string", b'"hello"', 400, "JSON object"),
    ("no-messages", {"model": "MODEL"}, 400, "messages"),
    ("empty-messages", body(messages=[]), 400, "messages"),
    ("no-model", {"messages": [TEXT]}, 400, "model"),
    ("unknown-model", body(model="gpt-4o"), 404, "does not exist"),
    ("unknown-field", body(frobnicate=1), 400, "Unrecognized request argument supplied: frobnicate"),
    ("tools-unsupported", body(tools=[{"type": "function"}]), 400, "Unrecognized request argument supplied: tools"),
    ("messages-not-a-list", body(messages="Hi"), 400, "messages"),
    ("message-not-an-object", body(messages=["Hi"]), 400, "messages.0"),
    ("content-wrong-type", body(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content"),
    ("content-missing", body(messages=[{"role": "user"}]), 400, "messages.0.content"),
    ("unknown-role", body(messages=[{"role": "tool", "content": "x"}]), 400, "messages.0.role"),
    ("unknown-part-type", body(messages=[{"role": "user", "content": [{"type": "audio", "x": 1}]}]), 400,
     "messages.0.content"),
    ("max-tokens-string", body(max_tokens="5"), 400, "max_tokens"),
    ("max-tokens-bool", body(max_tokens=True), 400, "max_tokens"),
    ("max-tokens-zero", body(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-float", body(max_tokens=2.5), 400, "max_tokens"),
    ("temperature-string", body(temperature="hot"), 400, "temperature"),
    ("temperature-negative", body(temperature=-1), 400, "temperature"),
    ("temperature-too-high", body(temperature=3), 400, "temperature"),
    ("temperature-nan", b'{"model": "MODEL", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
     400, "temperature"),
    ("top-p-zero", body(top_p=0), 400, "top_p"),
    ("seed-negative", body(seed=-1), 400, "seed"),
    ("stream-not-bool", body(stream="yes"), 400, "stream"),
    ("n-two", body(n=2), 400, "n"),
    ("logprobs", body(logprobs=True), 400, "logprobs"),
    ("penalty-unsupported", body(presence_penalty=0.5), 400, "presence_penalty"),
    ("stop-empty", body(stop=""), 400, "stop"),
    ("stop-too-many", body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("stop-wrong-type", body(stop=[1]), 400, "stop"),
    ("last-is-assistant", body(messages=[TEXT, {"role": "assistant", "content": "Hello"}]), 400, "last message"),
    ("only-system", body(messages=[{"role": "system", "content": "S"}]), 400, "last message"),
    ("system-after-user", body(messages=[TEXT, {"role": "system", "content": "S"}, TEXT]), 400, "system message"),
    ("two-images-one-message", body(messages=[{"role": "user", "content": [img(SMALL), img(SMALL)]}]), 400,
     "one image per request"),
    ("images-in-two-messages", body(messages=[{"role": "user", "content": [img(SMALL)]},
                                              {"role": "assistant", "content": "ok"},
                                              {"role": "user", "content": [img(SMALL)]}]), 400, "one image"),
    ("image-in-assistant", body(messages=[{"role": "assistant", "content": [img(SMALL)]}, TEXT]), 400,
     "only user messages"),
    ("image-in-system", body(messages=[{"role": "system", "content": [img(SMALL)]}, TEXT]), 400, "system message"),
    ("image-not-decodable", body(messages=[{"role": "user", "content": [img(data_url(b"GIF89a" + b"\0" * 64))]}]),
     400, "image"),
    ("image-random-bytes", body(messages=[{"role": "user", "content": [img(data_url(bytes(range(256)) * 8))]}]),
     400, f"not an image in a format this server reads ({', '.join(IMAGE_FORMATS)}; Unidentified"),
    # Pillow would hand EPS to Ghostscript: an untrusted request never reaches that decoder
    ("image-eps", body(messages=[{"role": "user", "content": [img(data_url(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n", "image/eps"))]}]), 400, "JPEG, PNG, WEBP"),
    ("image-truncated", body(messages=[{"role": "user", "content": [img(data_url(png_bytes(64, 64)[:200]))]}]),
     400, "image"),
    ("image-bad-base64", body(messages=[{"role": "user", "content": [img("data:image/png;base64,@@@not base64")]}]),
     400, "base64"),
    ("image-not-image-mime", body(messages=[{"role": "user", "content": [
        img("data:text/plain;base64," + base64.b64encode(b"hello").decode())]}]), 400, "data:image"),
    ("image-too-many-pixels", body(messages=[{"role": "user", "content": [img(data_url(flat_png(SIDE, SIDE)))]}]),
     400, "pixels"),
    ("image-http-url", body(messages=[{"role": "user", "content": [img("https://example.com/cat.jpg")]}]), 400,
     "does not fetch URLs"),
    ("image-file-outside", body(messages=[{"role": "user", "content": [img("file:///etc/passwd")]}]), 400,
     "outside the allowed folder"),
    ("image-url-missing", body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     400, "url"),
    ("max-tiles-zero", body(max_tiles=0), 400, "max_tiles"),
    ("max-tiles-above-model", body(max_tiles=20), 400, "above the 12 this model takes"),
    ("prompt-past-context", body(messages=[{"role": "user", "content": "hello " * 9000}]), 400, "context"),
    ("max-tokens-past-context", body(max_tokens=100_000), 400, "context"),
    ("stream-options-without-a-stream", body(stream_options={"include_usage": True}), 400,
     "stream_options: only allowed when stream is true"),
    ("tools-given", body(tools=[]), 400, "Unrecognized request argument supplied: tools"),
    ("refusal-with-text", body(messages=[TEXT, {"role": "assistant", "content": "No.", "refusal": "No."}, TEXT]), 400,
     "Unrecognized request argument supplied: messages.1.refusal"),
    ("file-url-loop", body(messages=[{"role": "user", "content": [img("file://FILES/loop")]}]), 400,
     "not a usable file path"),
    ("file-url-name-too-long", body(messages=[{"role": "user", "content": [img("file://FILES/" + "a" * 300)]}]), 400,
     "not a usable file path"),
    ("file-url-nul", body(messages=[{"role": "user", "content": [img("file://FILES/a%00b")]}]), 400,
     "not a usable file path"),
]

# (id, request body, the error's param): param names the field its message is about
PARAMS = [
    ("nested-role", body(messages=[{"role": "tool", "content": "x"}]), "messages.0.role"),
    ("stop-item", body(stop=[1]), "stop.0"),
    ("stream-options-field", body(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    ("text-part", body(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages.0.content.0.text"),
    ("image-detail", body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": SMALL, "detail": "ultra"}}]}]), "messages.0.content.0.image_url.detail"),
    ("stream-options-alone", body(stream_options={"include_usage": True}), "stream_options"),
    ("top-level", body(max_tokens="5"), "max_tokens"),
]


def _check_error(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["type"], str) and err["type"]
    assert "\n" not in err["message"] and len(err["message"]) < 400
    assert "Traceback" not in r.text and 'File "' not in r.text
    assert words.lower() in err["message"].lower(), err["message"]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request(server, case):
    _, payload, status, words = case
    if isinstance(payload, dict):
        loop = server.files / "loop"
        if not loop.is_symlink():
            loop.symlink_to(loop)  # a symlink to itself: resolving it loops
        payload = json.dumps(payload).replace('"MODEL"', json.dumps(server.model)).replace("file://FILES", f"file://{server.files}")
    elif isinstance(payload, bytes):
        payload = payload.replace(b'"MODEL"', json.dumps(server.model).encode())
    r = server.post(payload, headers={"content-type": "application/json"})
    _check_error(r, status, words)


@pytest.mark.parametrize("case", PARAMS, ids=[c[0] for c in PARAMS])
def test_an_errors_param_is_the_field_its_message_names(server, case):
    """`param` came from pydantic's first error while the message came from the deepest (param "model"
    for a message's role), and a content part's type stood in the path twice (content.0.text.text)."""
    _, payload, param = case
    r = server.post({**payload, "model": server.model})
    _check_error(r, 400, param + ":")
    assert r.json()["error"]["param"] == param


def test_nulls_for_unused_openai_parameters_and_a_clients_own_message_are_accepted(server):
    """The openai client sends what a caller passes as None (tools=None) as null, and a reply's
    `message.model_dump()` sent back as history carries refusal/tool_calls/annotations/audio as null:
    both were refused as unrecognized arguments. A null is "not used"; a value is still refused."""
    openai = pytest.importorskip("openai")
    from openai.types.chat import ChatCompletionMessage
    from openai.types.chat.completion_create_params import CompletionCreateParamsBase

    nulls = dict.fromkeys(set(CompletionCreateParamsBase.__annotations__) - {"model", "messages"})
    assert {"tools", "response_format", "stream_options", "temperature"} <= set(nulls), openai.__version__
    first = server.post({"model": server.model, "messages": [TEXT], "max_tokens": 2, **nulls})
    assert first.status_code == 200, first.text
    dumped = ChatCompletionMessage.model_validate(first.json()["choices"][0]["message"]).model_dump()
    assert {"refusal", "tool_calls", "annotations"} <= set(dumped)
    again = server.post({"model": server.model, "messages": [TEXT, dumped, TEXT], "max_tokens": 2})
    assert again.status_code == 200, again.text


def test_unknown_models_and_context_errors_carry_openais_codes(server):
    r = server.post(body(model="gpt-4o"))
    err = r.json()["error"]
    assert r.status_code == 404 and (err["type"], err["code"], err["param"]) == ("invalid_request_error", "model_not_found", "model")
    r = server.post({**body(max_tokens=100_000), "model": server.model})
    err = r.json()["error"]
    assert r.status_code == 400 and (err["code"], err["param"]) == ("context_length_exceeded", "messages")
    assert "tiles" not in err["message"]  # a text prompt: fewer tiles would not shorten it


def test_load_balancer_probes_and_wrong_methods(server):
    """HEAD /health and HEAD /v1/models answer 200 (probes use HEAD); a 405 says which methods the path takes."""
    assert httpx.head(server.base + "/health", timeout=30).status_code == 200
    assert httpx.head(server.base + "/v1/models", timeout=30).status_code == 200
    r = httpx.get(server.base + "/v1/chat/completions", timeout=30)
    assert r.status_code == 405 and r.headers.get("allow") == "POST", r.headers


def test_body_over_the_limit_is_413(server):
    """A 50 MB body: refused from its Content-Length, before it is read."""
    big = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (50 << 20) + b'"}]}'
    r = server.post(big, headers={"content-type": "application/json"})
    _check_error(r, 413, "larger than")


def test_chunked_body_over_the_limit_is_413(server):
    """No Content-Length (chunked): counted while it streams in."""
    def chunks():
        yield b'{"model": "x", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY_MB * 4):
            yield b"a" * (1 << 18)
        yield b'"}]}'
    r = httpx.post(server.base + "/v1/chat/completions", content=chunks(), timeout=60)
    _check_error(r, 413, "larger than")


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/chat/completions", 405), ("GET", "/v1/nothing", 404),
                                                  ("POST", "/v1/completions", 404), ("DELETE", "/v1/models", 405)])
def test_wrong_routes_and_methods(server, method, path, status):
    r = httpx.request(method, server.base + path, timeout=30)
    assert r.status_code == status
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_server_still_answers_after_every_bad_request(server):
    r = server.post({"model": server.model, "messages": [TEXT], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    assert httpx.get(server.base + "/health").status_code == 200
