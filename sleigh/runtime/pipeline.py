"""Image + question -> streamed text, on any backend.

    with Pipeline.load("pkg/") as pipe:                # a package (ONNX Runtime) or a checkpoint (torch)
        gen = pipe.generate("photo.jpg", "Describe the image.")
        for piece in gen:                              # text as it is decoded, never broken UTF-8
            print(piece, end="")
        gen.result.text, gen.result.token_ids, gen.result.timings
    # the block's end releases the sessions, engines and GPU memory (pipe.close())

The loop owns what is the same on every backend: tiling, the prompt, the GSWA attention bias,
the mask and positions, sampling, stop ids, streaming; the backend runs the modules. Each
generation owns its state (its KV cache, sampler and stream decoder), so one Pipeline serves
several callers: threads, or generations interleaved in one thread (see `Pipeline`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from sleigh.errors import SleighError
from sleigh.runtime import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPT
from sleigh.runtime.backends.base import Backend
from sleigh.runtime.image import default_max_pixels, tile_image, tiles_within
from sleigh.runtime.kv_cache import SlotCache
from sleigh.runtime.manifest import Contract
from sleigh.runtime.memory import MemoryBudget, Shapes, module_sizes, parse_size, stage_bytes
from sleigh.runtime.multimodal import image_attention_bias, no_image_rows, scaled_embeds
from sleigh.runtime.package import TOKENIZER, model_kind
from sleigh.runtime.prompt import IMG_CONTEXT, IMG_END, IMG_START, PromptTokenizer, StopStrings, StreamDecoder, Turn
from sleigh.runtime.sampling import Sampler, SamplingOptions, TokenHistory



class ContextExceeded(SleighError):
    """A prompt (with the answer's token limit) longer than the model's context: what `sleigh eval`
    skips a line for. `request_expected`: the remedy that is the request's (a server's client cannot
    choose the engine, the rest of `expected`)."""

    def __init__(self, what: str, problem: str, expected: str, engine_remedy: str | None = None):
        super().__init__(what, problem, expected + (f", or {engine_remedy}" if engine_remedy else ""))
        self.request_expected = expected


def checkpoint_has_no_engines(path: Path, what: str, option: str) -> SleighError:
    """An engine asked of a checkpoint folder (`option`: how the caller names the engine argument)."""
    return SleighError(what, f"{path} is a checkpoint: it runs on the PyTorch reference and has no engines",
                       f"a package from `sleigh export` (engines come from `sleigh build-engine`), or no {option}")


class ModelFault(SleighError):
    """The model's own output is unusable (non-finite GSWA weights): the model's fault, not the
    request's (the server answers 500, not 400)."""


@dataclass
class Timings:
    preprocess_s: float = 0.0
    vision_s: float = 0.0
    prefill_s: float = 0.0
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens_per_s: float = 0.0


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    grid: tuple[int, int] | None
    views: int
    gswa_weights: list[float]
    stop_reason: str  # "stop" (a stop id or stop string) or "length" (max_new_tokens)
    timings: Timings = field(default_factory=Timings)
    backend: str = ""
    kept_views: list[int] | None = None  # with a tile budget: the views the LLM read (gswa_weights covers all)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid) if self.grid else None
        return d


@dataclass
class Prefill:
    tiled: object  # TiledImage or None
    ids: list[int]
    image_embeds: np.ndarray  # (T, tokens per view, D) float32
    gswa_weights: np.ndarray  # (T,)
    logits: np.ndarray  # (1, V) at the last prompt position
    timings: Timings
    t_start: float
    cache: SlotCache  # the prompt's keys and values; the generation continuing from this state owns it
    continued: bool = False
    kept_views: list[int] | None = None  # with a tile budget: the views in image_embeds; gswa_weights covers all


class Generation:
    """Iterate for text pieces; `.result` once done (iterating to the end first if needed)."""

    def __init__(self, steps: Iterator[str]):
        self._steps = steps
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None  # what ended it, raised again on every later read

    def __iter__(self) -> Iterator[str]:
        return (piece for piece in self.each_token() if piece)

    def each_token(self) -> Iterator[str]:
        """The text pieces, one per generated token and "" for a token that adds no text yet (a special
        token, part of a character, the possible start of a stop string), then the rest held back: a
        caller that stops between any two tokens (a server whose client left) looks here."""
        if self._error is not None:
            raise self._error
        if self._result is not None:  # done: iterating again yields nothing and keeps the result
            return
        while True:
            try:
                piece = next(self._steps)
            except StopIteration as stop:
                self._result = stop.value
                return
            except Exception as e:
                self._error = e
                raise
            yield piece

    @property
    def result(self) -> GenerationResult:
        if self._result is None:
            for _ in self:
                pass
        return self._result


def check_count(what: str, value, minimum: int = 1, none: bool = False) -> None:
    """An integer argument of the Python API (not a bool, a float or a string), or None where `none`:
    one SleighError naming it."""
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SleighError(what, f"got {value!r:.40}", f"an integer >= {minimum}")


def check_text(what: str, value, none: bool = False) -> None:
    if value is None and none:
        return
    if not isinstance(value, str):
        raise SleighError(what, f"got {type(value).__name__}", "a string" + (", or None" if none else ""))


class Pipeline:
    """One loaded model, shared by any number of generations.

    Thread safety: the backend's modules (ONNX Runtime sessions, the torch model, TensorRT engines)
    are shared and only read; every `generate()` / `prefill()` makes its own KV cache, sampler and
    stream decoder. So several threads may call `generate()` on one Pipeline at once, and several
    `Generation`s may be advanced alternately in one thread: each gets the tokens it would get alone.
    ONNX Runtime runs concurrent calls in parallel; TensorRT serialises them per call inside the
    backend. One `Generation` (one iterator) must not be advanced from two threads at once.

    `close()` (or leaving a `with` block) releases the backend; closing twice is harmless, and
    generating afterwards raises a SleighError.
    """

    def __init__(self, backend: Backend, contract: Contract, tokenizer: PromptTokenizer):
        self.backend, self.contract, self.tokenizer = backend, contract, tokenizer
        # Special tokens typed in a prompt or system message stay text (what a server needs); True lets
        # trusted callers write control tokens such as <|im_end|> into the prompt.
        self.allow_special_tokens = False
        # Bounded peaks (runtime/memory.py): views per vision call and prompt tokens per decoder call
        # (None: all views at once, and the backend's fastest prefill calls, `Backend.prefill_chunk`), or a
        # budget that picks both per generation (`load(max_memory=...)`; never above the backend's chunk).
        self.vision_chunk: int | None = None
        self.prefill_chunk: int | None = None
        self.budget: MemoryBudget | None = None
        # Reserve the whole generation's KV slots (prompt + max_new_tokens) before the prefill, so no
        # growth holds old and new slots at once (what a budget counts on) or copies them: where that
        # costs the backend nothing (`Backend.reserve_is_free`), or under a budget. Otherwise the cache
        # grows by KV_CHUNK while decoding, since every step of a standard decoder reads all reserved
        # slots, masked or not.
        self.reserve_generation = backend.reserve_is_free

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", threads: int | None = None,
             engine: str | None = None, verify: bool = True, max_memory: int | str | None = None) -> Pipeline:
        """A package folder (manifest.json) or a Sleigh checkpoint folder (config.json). A package's
        files are checked against its manifest (sha256 on first use; `verify=False`: sizes only).
        `max_memory` (bytes, or a size such as "2.5G"): chunk vision and prefill to stay within it, and
        refuse in one line what cannot fit (runtime/memory.py); None: the engine's own budget
        (`build-engine --max-memory`), if it has one."""
        if not isinstance(path, (str, os.PathLike)):
            raise SleighError("path", f"got {type(path).__name__}", "a package or checkpoint folder (a str or path)")
        check_count("threads", threads, none=True)
        if not isinstance(max_memory, str):
            check_count("max_memory", max_memory, none=True)  # bytes
        limit = parse_size(max_memory) if isinstance(max_memory, str) else max_memory  # a typo costs no load
        pipe = cls._load(Path(path), backend, threads, engine, verify, budgeted=limit is not None)
        if limit is None and pipe.backend.entry is not None:
            limit = pipe.backend.entry.max_memory
        if limit is not None:  # checked once the backend is open: the engine it chose sets the weights
            shapes = Shapes.from_contract(pipe.contract, kv_dtype=pipe.backend.kv_dtype)
            sizes = module_sizes(pipe.backend.files, pipe.backend.resident)
            pipe.budget = MemoryBudget(limit, shapes, sum(sizes.values()),
                                       stage_bytes(sizes) if pipe.backend.releases_modules else None,
                                       torch=pipe.backend.name == "torch")
            pipe.reserve_generation = True
        return pipe

    @classmethod
    def _load(cls, path: Path, backend: str, threads: int | None, engine: str | None, verify: bool,
              budgeted: bool = False) -> Pipeline:
        if model_kind(path) == "package":
            return cls.from_package(path, backend=backend, threads=threads, engine=engine, verify=verify, budgeted=budgeted)
        if engine is not None:
            raise checkpoint_has_no_engines(path, f"engine={engine}", "engine")
        return cls.from_checkpoint(path, backend=backend, threads=threads)

    @classmethod
    def from_checkpoint(cls, path: Path, backend: str = "auto", threads: int | None = None) -> Pipeline:
        if backend not in ("auto", "torch"):
            raise SleighError(f"backend={backend}", "a checkpoint folder runs on the PyTorch reference only",
                              "backend torch, or a package made with `sleigh export`")
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise SleighError(str(path), "a checkpoint runs on the PyTorch reference and torch is not installed",
                              "a package from `sleigh export`, or pip install torch and 'sleigh[export]'")
        contract = Contract.of_checkpoint(path)
        tok = PromptTokenizer.from_file(Path(path) / TOKENIZER)
        return cls(_checkpoint_backend("torch").from_checkpoint(path, threads), contract, tok)

    @classmethod
    def from_package(cls, path: Path, backend: str = "auto", threads: int | None = None,
                     engine: str | None = None, verify: bool = True, budgeted: bool = False) -> Pipeline:
        from sleigh.runtime.backends import open_package_backend
        from sleigh.runtime.manifest import read_manifest

        manifest = read_manifest(path)
        backend = open_package_backend(path, manifest, backend, threads=threads, engine=engine, verify=verify,
                                       budgeted=budgeted)
        tok = PromptTokenizer.from_file(manifest.path(manifest.tokenizer, "manifest.json: tokenizer.file"))
        return cls(backend, manifest.contract, tok)

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.backend.closed

    def close(self) -> None:
        """Release the backend's sessions, engines and device memory (idempotent)."""
        self.backend.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise SleighError("pipeline", "used after close()", "Pipeline.load(...) again, or use it inside its `with` block")

    # -- the loop ---------------------------------------------------------------------------------

    def prepare(self, image=None, prompt: str | list[Turn] = DEFAULT_PROMPT, *, system: str | None = None,
                max_tiles: int | None = None, tile_budget: int | None = None, max_pixels: int | None = None):
        """Tiling and prompt ids (no model work): (tiled image or None, input ids). `prompt` is one
        question or a conversation (`Turn`s ending with a user turn; the image goes to the turn marked
        `image`, else the first user turn). With `tile_budget` the ids hold the image blocks of the
        views that budget keeps (`budget_views`); the tiled image holds every view. `max_pixels`: the
        largest image file taken (default: image.default_max_pixels(), 77 Mpx, what `sleigh run` takes
        whatever the model: the CLI checks the file before the model loads)."""
        self._check_tile_budget(tile_budget)
        self._check_max_tiles(max_tiles)
        check_text("system", system, none=True)
        if isinstance(prompt, str):
            turns = [Turn("user", prompt)]
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, Turn) for t in prompt):
            turns = list(prompt)
        else:
            raise SleighError("prompt", f"got {type(prompt).__name__}", "a string, or a list of Turn (a conversation)")
        for what, text in [("prompt", t.text) for t in turns] + [("system", system or "")]:
            for token in (IMG_CONTEXT, IMG_START, IMG_END) if self.allow_special_tokens else ():
                if token in text:
                    raise SleighError(what, f"contains {token}, which only the image block may hold",
                                      "text without image placeholder tokens (the image is given as IMAGE)")
        system = self.contract.prompt.system_message if system is None else system  # the model's own default
        fewest = self.tokenizer.fewest_tokens(turns, system=system)
        if fewest > self.context_length:  # before tiling and tokenizing, which would only confirm it (prefill may fill it)
            self._check_context(fewest, 1, fitted=True, image=image is not None, at_least=True)
        img, top = self.contract.image, self.max_tiles
        tiled = None
        if image is not None:
            tiled = tile_image(image, min_tiles=min(img.min_tiles, top), max_tiles=top if max_tiles is None else max_tiles,
                               size=img.size, thumbnail=img.thumbnail, mean=img.mean, std=img.std,
                               max_pixels=default_max_pixels() if max_pixels is None else max_pixels)  # the CLI's
        views = tiled.num_views if tiled else 0
        if tiled is not None and tile_budget is not None:
            views = min(tile_budget, tiled.grid[0] * tiled.grid[1]) + int(tiled.has_thumbnail)
        return tiled, self.tokenizer.encode_chat(turns, views, system=system,
                                                 tokens_per_view=self.contract.prompt.tokens_per_view,
                                                 allow_special_tokens=self.allow_special_tokens)

    def generate(self, image=None, prompt: str | list[Turn] = DEFAULT_PROMPT, *, system: str | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, sampling: SamplingOptions | None = None, ignore_eos: bool = False,
                 max_tiles: int | None = None, stop: str | list[str] | tuple[str, ...] = (),
                 tile_budget: int | None = None, fit_context: bool = False, max_pixels: int | None = None) -> Generation:
        """`stop`: a string or strings that end the answer (the text stops before the first one;
        token_ids keep the tokens generated up to the one that completed it). `tile_budget`: the LLM
        reads only the K tiles GSWA weighs highest, and the thumbnail (`budget_views`). `fit_context`:
        max_new_tokens is a default that the context may cut after the prompt (a server's, for a
        request that names no limit), not a request refused where prompt + max_new_tokens exceed it.
        `max_pixels`: the largest image file taken (`prepare`)."""
        self._check_open()
        self._check_tile_budget(tile_budget)
        check_count("max_new_tokens", max_new_tokens)
        self._check_max_tiles(max_tiles)
        sampling = self._sampling(sampling)
        StopStrings(stop)  # checks them now, not at the first token
        return Generation(self._steps(image, prompt, system, max_new_tokens, sampling, ignore_eos, max_tiles, stop,
                                      tile_budget, fit_context, max_pixels))

    def generate_from(self, state: Prefill, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, sampling: SamplingOptions | None = None,
                      ignore_eos: bool = False) -> Generation:
        """Continue from a `prefill()` state (it carries its own cache; each state can be continued once)."""
        self._check_open()
        check_count("max_new_tokens", max_new_tokens)
        sampling = self._sampling(sampling)
        if not isinstance(state, Prefill):
            raise SleighError("state", f"got {type(state).__name__}", "what prefill() returned")
        if state.continued or state.cache.length != len(state.ids):
            raise SleighError("generate_from", "this prefill state was already continued (its cache has moved on)",
                              "prefill() again")
        self._check_context(len(state.ids), max_new_tokens, image=state.tiled is not None)
        state.continued = True
        if self.reserve_generation:  # one growth now, none while decoding
            state.cache.reserve(min(len(state.ids) + max_new_tokens, self.context_length))
        return Generation(self._decode(state, max_new_tokens, sampling, ignore_eos))

    def prefill(self, image=None, prompt: str = DEFAULT_PROMPT, *, system: str | None = None,
                max_tiles: int | None = None, max_new_tokens: int = 0, tile_budget: int | None = None,
                max_pixels: int | None = None) -> Prefill:
        """Tiling, vision, embed and the decoder's prefill: the state generation starts from.
        Also what the accuracy gate compares between engines."""
        self._check_open()
        check_count("max_new_tokens", max_new_tokens, minimum=0)
        return self._prefill_state(image, prompt, system, max_tiles, max_new_tokens, tile_budget, max_pixels=max_pixels)

    @staticmethod
    def _sampling(sampling) -> SamplingOptions:
        if sampling is None:
            return SamplingOptions()
        if not isinstance(sampling, SamplingOptions):
            raise SleighError("sampling", f"got {type(sampling).__name__}",
                              "a SamplingOptions (sleigh.runtime.sampling), e.g. SamplingOptions(temperature=0.7)")
        return sampling

    def _check_context(self, prompt_tokens: int, max_new_tokens: int, fitted: bool = False, image: bool = True,
                       at_least: bool = False) -> None:
        """`fitted`: max_new_tokens is a default already cut to the context (`fit_context`): only the
        prompt can be at fault. `image`: the prompt holds an image (fewer tiles would shorten it).
        `at_least`: prompt_tokens is a lower bound of the prompt's text alone (PromptTokenizer.fewest_tokens)."""
        context, model = self.context_length, self.contract.generation.context_length
        if prompt_tokens + max_new_tokens <= context:
            return
        of = f"the context of {context}"
        if context < model:  # an engine built for less (build-engine --max-context, a TensorRT profile)
            of += f" engine {self._engine_name} was built for"
        tiles = "fewer tiles (max_tiles), " if image else ""
        if at_least:  # fewer tiles cannot help a text that fills the context alone
            problem, expected = f"the prompt's text holds at least {prompt_tokens} tokens, past {of}", "a shorter prompt"
        elif fitted:
            problem, expected = f"the prompt's {prompt_tokens} tokens leave no room for an answer in {of}", \
                f"{tiles}a shorter prompt"
        else:
            problem, expected = f"{prompt_tokens} prompt tokens + {max_new_tokens} new tokens exceed {of}", \
                f"{tiles}a shorter prompt or a smaller max_new_tokens"
        engine = f"the package's own modules (engine package), whose context is {model}" if context < model else None
        raise ContextExceeded("prompt", problem, expected, engine)

    @property
    def _engine_name(self) -> str:
        """The engine the backend runs, for messages about its limits (a checkpoint's backend has none)."""
        return getattr(getattr(self.backend, "entry", None), "name", "?")

    @property
    def max_tiles(self) -> int:
        """Most tiles per image: the model's, or fewer where an engine was built for fewer views."""
        img = self.contract.image
        return tiles_within(self.backend.max_views, img.max_tiles, img.thumbnail)

    @property
    def context_length(self) -> int:
        """Prompt and answer tokens together: the model's context, or less where an engine was built for less."""
        context = self.contract.generation.context_length
        return min(context, self.backend.max_context or context)

    def _fitted(self, max_new_tokens: int, prompt_tokens: int, fit_context: bool) -> int:
        """max_new_tokens, cut to what the context leaves after the prompt where `fit_context` (at least
        1: a prompt that fills the context alone is refused as ever)."""
        return max(1, min(max_new_tokens, self.context_length - prompt_tokens)) if fit_context else max_new_tokens

    def _prefill_state(self, image, prompt, system, max_tiles, max_new_tokens, tile_budget=None,
                       fit_context: bool = False, max_pixels: int | None = None) -> Prefill:
        """`prefill()` without the open check (`generate()` made it when called)."""
        contract, backend = self.contract, self.backend
        tpv, hidden = contract.prompt.tokens_per_view, contract.model.hidden_size
        t_start = time.perf_counter()
        tiled, ids = self.prepare(image, prompt, system=system, max_tiles=max_tiles, tile_budget=tile_budget,
                                  max_pixels=max_pixels)
        max_new_tokens = self._fitted(max_new_tokens, len(ids), fit_context)
        self._check_context(len(ids), max_new_tokens, fitted=fit_context, image=tiled is not None)
        timings = Timings(preprocess_s=time.perf_counter() - t_start)

        vision_chunk, prefill_chunk, staged = self.chunks(tiled.num_views if tiled else 0, len(ids), max_new_tokens)
        t = time.perf_counter()
        kept = None
        if tiled is not None:
            if staged:  # the image's stage alone (runtime/memory.py); the decoder opens again at its first step
                backend.release("decoder")
            image_embeds, weights = self._vision(tiled.pixel_values, vision_chunk)
            if tile_budget is not None:  # GSWA weighed every view; the LLM reads the kept ones
                kept = budget_views(weights, tiled.has_thumbnail, tile_budget)
                image_embeds = image_embeds[kept]
            image_rows = image_embeds.reshape(-1, hidden)
        else:
            image_embeds = np.zeros((0, tpv, hidden), np.float32)
            image_rows = no_image_rows(hidden)
            weights = np.zeros((0,), np.float32)
        timings.vision_s = time.perf_counter() - t
        if staged:  # the prompt's stage: no vision or GSWA beside the decoder (a text-only prompt included)
            backend.release("vision", "gswa")

        t = time.perf_counter()
        input_ids = np.asarray([ids], dtype=np.int64)  # (1, P)
        if tiled is None:  # text alone: token ids in (a decoder that embeds them itself runs no embed session)
            inputs = input_ids
        else:
            inputs = backend.run("embed", {"input_ids": input_ids, "image_embeds": image_rows})["inputs_embeds"]
        bias = np.zeros(input_ids.shape, np.float32)
        gswa = contract.gswa
        if tiled is not None and gswa is not None and gswa.apply == "attention":
            bias = image_attention_bias(input_ids, weights if kept is None else weights[kept],
                                        contract.prompt.img_context_token_id, tpv, gswa.min_weight)
        cache = backend.new_cache(1)
        cache.reserve(len(ids) + (max_new_tokens if self.reserve_generation else 0))  # with it, decoding never grows them
        logits = prefill_in_chunks(backend, cache, inputs, bias, prefill_chunk, image_rows if tiled is None else None)
        timings.prefill_s = time.perf_counter() - t
        return Prefill(tiled, ids, image_embeds, weights, logits, timings, t_start, cache, kept_views=kept)

    def _check_max_tiles(self, max_tiles: int | None) -> None:
        check_count("max_tiles", max_tiles, none=True)
        top, model = self.max_tiles, self.contract.image.max_tiles
        if max_tiles is not None and max_tiles > top:  # more views than the package (or engine) was built for
            if top == model:
                raise SleighError("max_tiles", f"got {max_tiles}, above this model's maximum of {top}", f"1 to {top}")
            raise SleighError("max_tiles", f"got {max_tiles}, above the maximum of {top} engine {self._engine_name} was built for",
                              f"1 to {top}, or the package's own modules (engine package) for up to {model}")

    def _check_tile_budget(self, tile_budget: int | None) -> None:
        if tile_budget is None:
            return
        if isinstance(tile_budget, bool) or not isinstance(tile_budget, (int, np.integer)) or tile_budget < 1:  # as check_count
            raise SleighError("tile_budget", f"got {tile_budget!r}", "an integer >= 1 (tiles kept besides the thumbnail)")
        if self.contract.gswa is None:
            raise SleighError("tile_budget", "this model has no GSWA to weigh its tiles",
                              "a model with GSWA (sleigh convert --gswa identity or PATH), or no tile budget")

    def chunks(self, views: int, prompt_tokens: int, new_tokens: int) -> tuple[int, int, bool]:
        """(views per vision call, prompt tokens per decoder call, whether the modules are held a
        stage at a time) for a generation of these sizes: what a prefill runs with."""
        fastest = self.backend.prefill_chunk or prompt_tokens  # the backend's fastest calls
        if self.budget is not None:
            plan = self.budget.plan(views, prompt_tokens, new_tokens)
            # a backend's chunk never peaks higher than the plan's: it is set only for a fused decoder, whose calls
            # hold chunk x reserved-slots scores (GroupQueryAttention sizes them by the cache buffer, in one call too)
            return plan.vision_chunk, min(plan.prefill_chunk, fastest), plan.staged
        return max(self.vision_chunk or views, 1), self.prefill_chunk or fastest, False

    def _vision(self, pixel_values: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """pixel_values (T, 3, S, S) -> image_embeds (T, tokens per view, D), gswa_weights (T,). The
        vision module reads each view alone, so it runs in calls of `chunk` views; GSWA attends over
        every view's CLS token, so the gswa module then runs once on all of them. With
        gswa.apply == "scale" the embeddings are scaled by the weights (multimodal.scaled_embeds)."""
        views = pixel_values.shape[0]
        image_embeds = cls_tokens = None  # every view's, written chunk by chunk (no concatenated copy)
        for start in range(0, views, chunk):
            vis = self.backend.run("vision", {"pixel_values": pixel_values[start:start + chunk]})
            if image_embeds is None:
                image_embeds = np.empty((views, *vis["image_embeds"].shape[1:]), np.float32)
                cls_tokens = np.empty((views, *vis["cls_tokens"].shape[1:]), np.float32)
            image_embeds[start:start + chunk] = vis["image_embeds"]
            cls_tokens[start:start + chunk] = vis["cls_tokens"]
        weights = self.backend.run("gswa", {"cls_tokens": cls_tokens})["gswa_weights"].astype(np.float32)
        if not np.isfinite(weights).all():  # they would bias attention, and no JSON carries them
            raise ModelFault(f"the gswa module ({self.backend.describe()})",
                             f"weighs {np.count_nonzero(~np.isfinite(weights))} of {views} views NaN or infinite",
                             "finite weights: the model's weights are broken or this engine overflows "
                             "(check it with `sleigh compare`, or run the package's FP32 modules)")
        gswa = self.contract.gswa
        return (image_embeds if gswa is None else scaled_embeds(image_embeds, weights, gswa.apply)), weights

    def _steps(self, image, prompt, system, max_new_tokens, sampling, ignore_eos, max_tiles, stop=(), tile_budget=None,
               fit_context=False, max_pixels=None):
        state = self._prefill_state(image, prompt, system, max_tiles, max_new_tokens, tile_budget, fit_context, max_pixels)
        state.continued = True
        max_new_tokens = self._fitted(max_new_tokens, len(state.ids), fit_context)
        return (yield from self._decode(state, max_new_tokens, sampling, ignore_eos, stop))

    def _decode(self, state: Prefill, max_new_tokens, sampling, ignore_eos, stop=()):
        try:
            return (yield from self._decode_steps(state, max_new_tokens, sampling, ignore_eos, stop))
        finally:  # done, failed or abandoned: the cache is of no further use (device memory on a GPU)
            state.cache.close()

    def _decode_steps(self, state: Prefill, max_new_tokens, sampling, ignore_eos, stop=()):
        contract, backend, cache = self.contract, self.backend, state.cache
        tiled, ids, weights, logits, timings = state.tiled, state.ids, state.gswa_weights, state.logits, state.timings
        t_start = state.t_start

        sampler = Sampler(sampling)
        stream = StreamDecoder(self.tokenizer)
        stops_text = StopStrings(stop)
        no_image = no_image_rows(contract.model.hidden_size)
        stops = set(contract.generation.stop_token_ids)
        history = TokenHistory(ids)  # what the repetition penalty applies to
        generated: list[int] = []
        stop_reason = "length"
        t_first = None
        usable = self.tokenizer.vocab_size  # a padded model vocabulary has ids no tokenizer can decode
        one_mask, one_bias = np.ones((1, 1), np.int64), np.zeros((1, 1), np.float32)  # a generated token's (no GSWA bias)
        while True:
            token = sampler(logits[0, :usable], history)
            if t_first is None:
                t_first = time.perf_counter()
                timings.time_to_first_token_s = t_first - t_start
            if token in stops and not ignore_eos:
                stop_reason = "stop"
                break
            generated.append(token)
            history.append(token)
            yield stops_text.push(stream.push(token))
            if stops_text.hit is not None:
                stop_reason = "stop"
                break
            if len(generated) >= max_new_tokens:
                break
            pos = len(ids) + len(generated) - 1
            logits = backend.step_tokens(cache, np.asarray([[token]], np.int64), one_mask, one_bias,
                                         np.asarray([[pos]], np.int64), no_image)
        yield stops_text.push(stream.flush()) + stops_text.flush()
        timings.decode_s = time.perf_counter() - t_first
        if len(generated) > 1 and timings.decode_s > 0:
            timings.decode_tokens_per_s = (len(generated) - 1) / timings.decode_s
        return GenerationResult(
            text=stops_text.text, token_ids=generated, prompt_tokens=len(ids),
            grid=tiled.grid if tiled else None, views=tiled.num_views if tiled else 0,
            gswa_weights=[float(w) for w in weights], stop_reason=stop_reason, timings=timings,
            backend=backend.describe(), kept_views=state.kept_views)


def budget_views(gswa_weights: np.ndarray, has_thumbnail: bool, tile_budget: int) -> list[int]:
    """The views a tile budget keeps, in their order: the `tile_budget` tiles GSWA weighs highest
    (the earlier tile on a tie) and the thumbnail (last), which carries the whole image."""
    views = len(gswa_weights)
    tiles = views - int(has_thumbnail)
    top = np.argsort(-np.asarray(gswa_weights[:tiles]), kind="stable")[:tile_budget]
    return sorted(int(i) for i in top) + list(range(tiles, views))


def _checkpoint_backend(name: str):
    """The backend class that runs a checkpoint folder, found through the `sleigh.checkpoint_backends`
    entry points (pyproject.toml), so the runtime imports none of the reference itself."""
    from importlib.metadata import entry_points

    found = entry_points(group="sleigh.checkpoint_backends", name=name)
    if not found:
        raise SleighError(f"backend={name}", "no backend of that name is installed for checkpoint folders",
                          "Sleigh installed with pip (its entry points), or a package from `sleigh export`")
    return next(iter(found)).load()


def prefill_in_chunks(backend: Backend, cache, inputs: np.ndarray, bias: np.ndarray, chunk: int,
                      no_image: np.ndarray | None) -> np.ndarray:
    """A batch-1 prompt into the cache, `chunk` positions per decoder call (each after the first against
    the cache's reserved slots: attention activations chunk x slots, not context^2) -> the last
    position's logits (1, V). `inputs`: inputs_embeds (1, P, D), or with `no_image` given (the
    embed module's image rows for text), token ids (1, P) through `Backend.step_tokens`."""
    P = inputs.shape[1]
    for start in range(0, P, chunk):
        end = min(start + chunk, P)
        args = (cache, inputs[:, start:end], np.ones((1, end - start), np.int64), bias[:, start:end],
                np.arange(start, end, dtype=np.int64)[None])
        logits = backend.step(*args) if no_image is None else backend.step_tokens(*args, no_image)
    return logits
