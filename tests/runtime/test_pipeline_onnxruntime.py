"""The light runtime on a package: ONNX Runtime equals the torch reference, streaming, sampling,
no heavy imports, and clear errors."""

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sleigh.errors import SleighError
from sleigh.runtime.kv_cache import KV_CHUNK
from sleigh.runtime.pipeline import Pipeline
from sleigh.runtime.sampling import SamplingOptions
from tests.helpers import one_error_line

EXAMPLES = Path(__file__).parents[2] / "examples"
HEAVY = ("torch", "transformers", "onnx", "onnxscript", "tensorrt")


def _photo(tmp_path: Path, size: tuple[int, int]) -> Path:
    path = tmp_path / f"photo_{size[0]}x{size[1]}.png"
    Image.open(EXAMPLES / "chelsea.jpg").convert("RGB").resize(size).save(path)
    return path


@pytest.fixture(scope="module")
def pipelines(tiny_ckpt, tiny_pkg):
    return Pipeline.load(tiny_ckpt), Pipeline.load(tiny_pkg)


@pytest.mark.parametrize("size,views", [((448, 448), 1), ((896, 448), 3), ((1792, 1344), 13), ((2400, 90), None)])
def test_onnxruntime_greedy_tokens_equal_torch(pipelines, tmp_path, size, views):
    from sleigh.export.parity import tolerance

    ref_pipe, ort_pipe = pipelines
    image = _photo(tmp_path, size)
    ref = ref_pipe.generate(image, "What is this?", max_new_tokens=12, ignore_eos=True).result
    got = ort_pipe.generate(image, "What is this?", max_new_tokens=12, ignore_eos=True).result
    if views is not None:
        assert got.views == views
    else:  # extreme aspect ratio: a single row of tiles
        assert got.grid[1] == 1 and got.grid[0] >= 6
    if got.views > 2:
        assert max(abs(w - 1) for w in got.gswa_weights) > 0.01  # GSWA is active
    np.testing.assert_allclose(got.gswa_weights, ref.gswa_weights, atol=tolerance("gswa_weights")[0])  # the parity table's
    assert got.token_ids == ref.token_ids
    assert got.prompt_tokens == ref.prompt_tokens


def test_text_only_prompt_equal_tokens(pipelines):
    ref_pipe, ort_pipe = pipelines
    ref = ref_pipe.generate(None, "Tell me a story.", max_new_tokens=16, ignore_eos=True).result
    got = ort_pipe.generate(None, "Tell me a story.", max_new_tokens=16, ignore_eos=True).result
    assert got.views == 0 and got.grid is None and got.gswa_weights == []
    assert got.token_ids == ref.token_ids


def test_streamed_text_equals_final_text(pipelines):
    _, pipe = pipelines
    gen = pipe.generate(EXAMPLES / "coffee.jpg", max_new_tokens=24, ignore_eos=True)
    pieces = list(gen)
    assert len(pieces) > 1
    assert "".join(pieces) == gen.result.text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in gen.result.text


def test_seeded_sampling_repeats_exactly(pipelines):
    _, pipe = pipelines
    opts = SamplingOptions(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=11)
    a = pipe.generate(None, "hello", max_new_tokens=20, sampling=opts, ignore_eos=True).result.token_ids
    b = pipe.generate(None, "hello", max_new_tokens=20, sampling=opts, ignore_eos=True).result.token_ids
    c = pipe.generate(None, "hello", max_new_tokens=20, ignore_eos=True,
                      sampling=SamplingOptions(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=12)).result.token_ids
    assert a == b
    assert a != c


def test_decode_steps_write_the_kv_cache_in_place(pipelines):
    """Within its capacity the cache is never reallocated: each step writes its position into the
    same buffers; growing adds one chunk and keeps what was cached."""
    _, pipe = pipelines
    backend, rng = pipe.backend, np.random.default_rng(0)
    D = pipe.contract.model.hidden_size

    cache = backend.new_cache(1)

    def step(S, P):
        return backend.step(cache, rng.standard_normal((1, S, D)).astype(np.float32), np.ones((1, S), np.int64),
                            np.zeros((1, S), np.float32), np.arange(P, P + S, dtype=np.int64)[None])

    P = 40
    step(P, 0)
    assert cache.length == P and cache.capacity == KV_CHUNK
    buffers = dict(cache.slots)
    for i in range(KV_CHUNK - P):
        step(1, P + i)
    assert cache.length == KV_CHUNK
    assert all(cache.slots[n] is buffers[n] for n in buffers)  # the same arrays: written in place
    assert all(np.abs(b[:, :, :KV_CHUNK]).min(axis=-1).max() > 0 for b in buffers.values())  # every slot written
    step(1, KV_CHUNK)
    assert cache.capacity == 2 * KV_CHUNK and cache.length == KV_CHUNK + 1
    for n, old in buffers.items():
        assert cache.slots[n] is not old and np.array_equal(cache.slots[n][:, :, :KV_CHUNK], old[:, :, :KV_CHUNK])


def _record_caches(backend, monkeypatch, make=None) -> list:
    """Every cache the backend makes from now on (made by `make(batch)` where given)."""
    made, make = [], make or backend.new_cache

    def new_cache(batch=1):
        made.append(make(batch))
        return made[-1]

    monkeypatch.setattr(backend, "new_cache", new_cache)
    return made


def _generate_watching_the_slots(pipe, n: int, *, reserved: bool = True):
    """(token ids, the slot buffers each decoder step read, the cache) of one greedy generation.
    `reserved=False`: the cache as it was before pre-sizing, ignoring the Pipeline's reservation
    (the first `reserve` call) so that it grows while decoding."""
    backend, made, seen = pipe.backend, [], []

    def new_cache(batch=1):
        cache = type(backend).new_cache(backend, batch)
        if not reserved:
            grow, calls = cache.reserve, []
            cache.reserve = lambda positions: calls.append(positions) or (grow(positions) if len(calls) > 1 else None)
        made.append(cache)
        return cache

    def step(cache, *args):
        seen.append(tuple(cache.slots.values()))
        return type(backend).step(backend, cache, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backend, "new_cache", new_cache)
        mp.setattr(backend, "step", step)
        mp.setattr(pipe, "reserve_generation", reserved)
        tokens = pipe.generate(None, "Tell me a story.", max_new_tokens=n, ignore_eos=True).result.token_ids
    assert len(made) == 1
    return tokens, seen, made[0]


def test_a_generation_within_max_new_tokens_never_reallocates_its_slots(pipelines):
    """With `reserve_generation` (set by a memory budget) the Pipeline reserves prompt + max_new_tokens
    slots before the prefill: every decoder step of the
    generation reads the same buffers, on ONNX Runtime and on the torch reference, and the tokens
    are those of a cache that grows while decoding (the torch one: a plain concatenated cache)."""
    ref_pipe, ort_pipe = pipelines
    prompt_tokens = len(ort_pipe.prepare(None, "Tell me a story.")[1])
    n = KV_CHUNK - prompt_tokens + 8  # past one chunk: a cache that was not reserved grows while decoding
    want, grown_seen, grown = _generate_watching_the_slots(ref_pipe, n, reserved=False)
    assert len({id(s[0]) for s in grown_seen}) > 1 and grown.capacity == prompt_tokens + n - 1  # it grew, one slot a step
    for pipe, capacity in ((ref_pipe, prompt_tokens + n), (ort_pipe, 2 * KV_CHUNK)):
        tokens, seen, cache = _generate_watching_the_slots(pipe, n)
        assert tokens == want and cache.capacity == capacity and cache.closed
        assert len(seen) == n and all(all(a is b for a, b in zip(s, seen[0])) for s in seen)  # never reallocated
    tokens, seen, cache = _generate_watching_the_slots(ort_pipe, n, reserved=False)  # growth still works
    assert tokens == want and len({id(s[0]) for s in seen}) == 3  # the prefill's chunk, then two


def test_context_overflow_and_bad_options_are_clear(pipelines):
    _, pipe = pipelines
    with pytest.raises(SleighError, match="exceed the context") as e:
        pipe.generate(None, "hi", max_new_tokens=pipe.contract.generation.context_length).result
    assert "smaller max_new_tokens" in str(e.value) and "--" not in str(e.value)  # a library error names parameters
    with pytest.raises(SleighError, match=r"^max_new_tokens \|"):
        pipe.generate(None, "hi", max_new_tokens=0)
    with pytest.raises(SleighError, match="top_p"):
        SamplingOptions(temperature=1.0, top_p=0.0)


def test_runtime_imports_no_torch_transformers_or_onnx(tiny_pkg):
    code = f"""
import sys
from sleigh.cli import main
sys.argv = ["sleigh", "run", {str(EXAMPLES / 'chelsea.jpg')!r}, "--model", {str(tiny_pkg)!r}, "--max-new-tokens", "3", "--json"]
try:
    main()
finally:
    heavy = [m for m in {HEAVY!r} if m in sys.modules]
    print("HEAVY=" + ",".join(heavy), file=sys.stderr)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stderr or proc.stderr.strip().endswith("HEAVY="), proc.stderr
    out = json.loads(proc.stdout)
    assert out["views"] > 1 and len(out["token_ids"]) >= 1
    for key in ("preprocess_s", "vision_s", "time_to_first_token_s", "decode_tokens_per_s"):
        assert key in out["timings"]


def _sleigh(*args, env=None):
    return subprocess.run([sys.executable, "-m", "sleigh.cli", *args], capture_output=True, text=True, timeout=300, env=env)



def test_run_bad_input(tiny_pkg, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert "corrupt.jpg" in one_error_line(_sleigh("run", str(corrupt), "--model", str(tiny_pkg)))
    assert "not found" in one_error_line(_sleigh("run", "--model", str(tmp_path / "no-such-pkg")))
    broken = tmp_path / "broken-pkg"
    import shutil

    shutil.copytree(tiny_pkg, broken)
    (broken / "decoder.onnx").unlink()
    assert "decoder.onnx" in one_error_line(_sleigh("run", "--model", str(broken)))
    line = one_error_line(_sleigh("run", str(EXAMPLES / "chelsea.jpg"), "--model", str(tiny_pkg), "--max-new-tokens", "100000"))
    assert "exceed the context" in line and "(--max-tiles)" in line and "smaller --max-new-tokens" in line  # the CLI's flags
    line = one_error_line(_sleigh("run", "--model", str(tiny_pkg), "--max-new-tokens", "100000"))
    assert "exceed the context" in line and "tiles" not in line  # a text prompt: fewer tiles would not shorten it
    assert "max-new-tokens" in one_error_line(_sleigh("run", "--model", str(tiny_pkg), "--max-new-tokens", "0"))
    assert "unknown backend" in one_error_line(_sleigh("run", "--model", str(tiny_pkg), "--backend", "tpu"))
    env = {k: v for k, v in __import__("os").environ.items() if k != "SLEIGH_MODEL"}
    assert "sleigh export" in one_error_line(_sleigh("run", str(EXAMPLES / "chelsea.jpg"), env=env))


def test_model_defaults_to_the_environment_variable(tiny_pkg):
    import os

    env = {**os.environ, "SLEIGH_MODEL": str(tiny_pkg)}
    proc = _sleigh("run", "--prompt", "hi", "--max-new-tokens", "2", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["backend"].startswith("onnxruntime")


def test_image_placeholder_tokens_in_the_prompt_are_refused(pipelines):
    _, pipe = pipelines
    pipe.allow_special_tokens = True  # by default they are plain text (tests/runtime/test_prompt.py)
    try:
        for text in ("look <IMG_CONTEXT> here", "<img>", "x</img>"):
            with pytest.raises(SleighError, match="image block"):
                pipe.generate(EXAMPLES / "coffee.jpg", text).result
        with pytest.raises(SleighError, match="^system"):
            pipe.generate(None, "hi", system="<IMG_CONTEXT>").result
    finally:
        pipe.allow_special_tokens = False
    assert pipe.generate(None, "what does <img> mean in HTML?", max_new_tokens=2).result.prompt_tokens > 0


def test_a_backend_shorter_context_is_checked_before_generating(tiny_pkg):
    pipe = Pipeline.load(tiny_pkg)

    class Short(type(pipe.backend)):
        max_context = 64

    pipe.backend.__class__ = Short
    with pytest.raises(SleighError, match="context of 64"):
        pipe.generate(None, "hello", max_new_tokens=60).result


def test_generate_from_a_prefill_equals_generate(pipelines):
    _, pipe = pipelines
    want = pipe.generate(EXAMPLES / "coffee.jpg", "hi", max_new_tokens=8, ignore_eos=True).result.token_ids
    state = pipe.prefill(EXAMPLES / "coffee.jpg", "hi", max_new_tokens=8)
    assert pipe.generate_from(state, max_new_tokens=8, ignore_eos=True).result.token_ids == want
    # a state carries its own cache: another prefill in between changes nothing, continuing it twice is refused
    want = pipe.generate(None, "hi", max_new_tokens=6, ignore_eos=True).result.token_ids
    state = pipe.prefill(None, "hi")
    other = pipe.prefill(None, "a longer prompt than the first one")
    assert pipe.generate_from(state, max_new_tokens=6, ignore_eos=True).result.token_ids == want
    with pytest.raises(SleighError, match="already continued"):
        pipe.generate_from(state, max_new_tokens=2)
    assert other.cache.length == len(other.ids)


class HostCopier:
    """runtime/backends/cuda.Cuda's copy_rows/zero/sync on host memory: runs the CUDA provider's
    slot bookkeeping (offsets, pitches, growth) on the CPU, where it can be checked."""

    def copy_rows(self, dst, dst_pitch, src, src_pitch, width, rows):
        for r in range(rows):
            ctypes.memmove(dst + r * dst_pitch, src + r * src_pitch, width)

    def zero(self, ptr, nbytes):
        ctypes.memset(ptr, 0, nbytes)

    def sync(self):
        pass


def test_device_slot_path_equals_torch_across_a_chunk(pipelines, monkeypatch):
    """The CUDA provider's path (IOBinding, OrtValue slots reserved for the generation, pitched copies
    of the new keys/values) run on CPU OrtValues: the same greedy tokens as the torch reference, past
    one chunk of slots (growth on this storage: tests/runtime/test_kv_cache.py)."""
    import onnxruntime as ort

    from sleigh.runtime.backends.onnxruntime_backend import OrtValueSlots

    ref_pipe, ort_pipe = pipelines
    backend = ort_pipe.backend
    monkeypatch.setattr(backend, "slot_storage", OrtValueSlots(ort, HostCopier(), device="cpu"))
    caches = _record_caches(backend, monkeypatch)
    prompt_tokens = len(ort_pipe.prepare(None, "Tell me a story.")[1])
    n = KV_CHUNK - prompt_tokens + 8
    got = ort_pipe.generate(None, "Tell me a story.", max_new_tokens=n, ignore_eos=True).result
    ref = ref_pipe.generate(None, "Tell me a story.", max_new_tokens=n, ignore_eos=True).result
    assert len(caches) == 1 and caches[0].capacity == 2 * KV_CHUNK
    assert isinstance(caches[0].storage, OrtValueSlots) and caches[0].closed  # the IOBinding path; freed when done
    assert got.token_ids == ref.token_ids

    # two generations on the device path, advanced alternately: each keeps its own slots
    prompts = ("Tell me a story.", "What is in the cup?")
    want = [ref_pipe.generate(EXAMPLES / "coffee.jpg", p, max_new_tokens=10, ignore_eos=True).result.token_ids
            for p in prompts]
    gens = [ort_pipe.generate(EXAMPLES / "coffee.jpg", p, max_new_tokens=10, ignore_eos=True) for p in prompts]
    _advance_alternately(gens)
    assert [g.result.token_ids for g in gens] == want


def _advance_alternately(gens: list) -> int:
    """One piece of each generation in turn until all are done; returns how many turns interleaved."""
    live, turns = [iter(g) for g in gens], 0
    while live:
        for it in list(live):
            if next(it, None) is None:
                live.remove(it)
            elif len(live) > 1:
                turns += 1
    return turns


# Different images and prompts, so that a generation that read another's cache would say something else.
REQUESTS = [(EXAMPLES / "coffee.jpg", "What is in the cup?"), (None, "Tell me a story."),
            (EXAMPLES / "chelsea.jpg", "Describe the image."), (None, "hello")]


@pytest.mark.parametrize("which", ["torch", "onnxruntime"])
def test_generations_advanced_alternately_each_get_their_own_tokens(pipelines, which):
    pipe = pipelines[0] if which == "torch" else pipelines[1]
    want = [pipe.generate(image, prompt, max_new_tokens=10, ignore_eos=True).result.token_ids for image, prompt in REQUESTS]
    assert len({tuple(w) for w in want}) == len(want)  # the requests really differ
    gens = [pipe.generate(image, prompt, max_new_tokens=10, ignore_eos=True) for image, prompt in REQUESTS]
    assert _advance_alternately(gens) >= 10
    assert [g.result.token_ids for g in gens] == want
    # and prefill states: both made first, then continued one after the other
    states = [pipe.prefill(image, prompt, max_new_tokens=10) for image, prompt in REQUESTS[:2]]
    assert [pipe.generate_from(s, max_new_tokens=10, ignore_eos=True).result.token_ids for s in states] == want[:2]


def test_one_pipeline_in_four_threads_equals_serial_greedy(pipelines):
    """4 threads x 3 greedy generations each on one shared Pipeline: every result equals the serial one."""
    from concurrent.futures import ThreadPoolExecutor

    _, pipe = pipelines
    jobs = [REQUESTS[(t + i) % len(REQUESTS)] for t in range(4) for i in range(3)]
    serial = {r: pipe.generate(*r, max_new_tokens=12, ignore_eos=True).result.token_ids for r in REQUESTS}

    def worker(t: int) -> list:
        return [(r, pipe.generate(*r, max_new_tokens=12, ignore_eos=True).result.token_ids) for r in jobs[3 * t:3 * t + 3]]

    with ThreadPoolExecutor(4) as pool:
        results = [x for chunk in pool.map(worker, range(4)) for x in chunk]
    assert len(results) == 12
    wrong = [r for r, tokens in results if tokens != serial[r]]
    assert not wrong, f"{len(wrong)} of 12 differ from the serial output"


@pytest.mark.parametrize("which", ["torch", "onnxruntime"])
def test_close_releases_the_backend_once_and_refuses_later_use(tiny_ckpt, tiny_pkg, which):
    import gc
    import weakref

    with Pipeline.load(tiny_ckpt if which == "torch" else tiny_pkg) as pipe:
        backend = pipe.backend
        held = weakref.ref(backend.model if which == "torch" else backend.sessions["decoder"])  # the weights / a session
        want = pipe.generate(None, "hi", max_new_tokens=4, ignore_eos=True).result.token_ids
        started = iter(pipe.generate(None, "hi", max_new_tokens=4, ignore_eos=True))
        next(started)  # a generation still going when the block ends
    gc.collect()
    assert pipe.closed and held() is None  # released, not merely marked
    pipe.close()  # a second close is a no-op
    for call in (lambda: pipe.generate(None, "hi"), lambda: pipe.prefill(None, "hi")):
        with pytest.raises(SleighError) as e:
            call()
        assert str(e.value) == ("pipeline | used after close(). Expected: Pipeline.load(...) again, or use it inside "
                                "its `with` block")
    with pytest.raises(SleighError, match=f"^backend {which} \\| used after close"):
        next(started)
    with pytest.raises(SleighError, match="used after close"):
        backend.new_cache(1)
    assert want  # what it said while open


def test_a_generation_checks_once_that_the_pipeline_is_open(pipelines, monkeypatch):
    _, pipe = pipelines
    calls = []
    check = Pipeline._check_open
    monkeypatch.setattr(Pipeline, "_check_open", lambda self: (calls.append(self), check(self))[1])
    assert pipe.generate(None, "hi", max_new_tokens=2, ignore_eos=True).result.token_ids
    assert len(calls) == 1
    pipe.prefill(None, "hi")
    assert len(calls) == 2


def test_every_caller_closes_the_pipelines_it_opens(tiny_pkg, tmp_path, monkeypatch):
    """The accuracy gate, bench, eval, the serve worker and `sleigh run` (also when it fails) leave no
    Pipeline open."""
    from typer.testing import CliRunner

    from sleigh.bench import run_bench
    from sleigh.cli import app
    from sleigh.engines.accuracy import run_gate
    from sleigh.evaluate import evaluate
    from sleigh.runtime.manifest import EngineEntry, read_manifest
    from sleigh.serve.worker import ModelWorker

    opened: list[Pipeline] = []
    init = Pipeline.__init__
    monkeypatch.setattr(Pipeline, "__init__", lambda self, *a, **k: (opened.append(self), init(self, *a, **k))[1])

    modules = {m: e["file"] for m, e in read_manifest(tiny_pkg).json["modules"].items()}
    run_gate(tiny_pkg, EngineEntry("fp32", "onnxruntime", "fp32", modules), num_pairs=1)
    run_bench([("pkg", tiny_pkg, "onnxruntime", None)], None, "hi", runs=1, max_new_tokens=2, quiet=True)
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"image": str(EXAMPLES / "coffee.jpg"), "question": "What?", "answer": "x"}) + "\n")
    evaluate(tiny_pkg, data, max_new_tokens=2, quiet=True)
    ModelWorker(Pipeline.load(tiny_pkg), max_queue=1, owns_pipeline=True).close()
    cli = CliRunner()
    assert cli.invoke(app, ["run", "--model", str(tiny_pkg), "-p", "hi", "--max-new-tokens", "2", "--json"]).exit_code == 0
    assert cli.invoke(app, ["run", "--model", str(tiny_pkg), "-p", "hi", "--max-new-tokens", "100000"]).exit_code != 0
    assert len(opened) == 7 and all(p.closed for p in opened)
