"""A memory budget for a run: how much one generation needs, and the chunk sizes that make it fit.

The model is a planning estimate from the model's shapes (the config in the manifest), not an
account of every allocation. For one generation with T views, P prompt tokens and N new tokens:

    peak = BASE + weights + kv(P + N) + image(T) + vision(v) + max(prefill(s, C), prefill(1, K + 1))

- BASE: the interpreter with numpy, onnxruntime and the tokenizer loaded.
- weights: the bytes of the module files the backend opened (external data included), or what
  opening each added to the process where the backend measured more (ONNX Runtime on Linux:
  prepacked INT4 weights take more than their file; `module_sizes`).
- kv(n): 2 (key, value) x layers x KV heads x head dim x the slots' bytes (4 for float32, 2 for
  float16: the backend's `kv_dtype`, from the manifest) per cache slot, for the
  K slots the Pipeline reserves before the prefill under a budget, and where that is free
  (P + N rounded up to KV_CHUNK, `Pipeline.reserve_generation`), once: a generation within its N
  never grows the cache, so no growth holds old and new slots at once.
- vision(v): v views in one call of the vision module; per view and layer (ONNX Runtime frees a
  layer's intermediates before the next) VISION_ATTENTION attention-score matrices heads x N x N,
  two MLP-wide and VISION_HIDDEN hidden-wide tensors of N = (image/patch)^2 + 1 tokens, fp32.
  Fit to the full-size INT8 vision on the CPU: about 290 MB per view (issue 14: +2.0 GB at 7 views,
  +3.9 GB at 13). The vision module reads each view alone and GSWA (its own module, a few small
  tensors per view) runs once after it on every view's CLS token, so v may be any chunk of the views.
- image(T): every view's image embeddings, held from vision through the embed call: T x tokens per
  view x hidden, fp32, counted twice: a margin for the heap the vision chunks leave behind (the
  prefill after vision in chunks peaked ~55 MB higher: benchmarks/RESULTS.md, "Vision in chunks of views").
- prefill(s, C): s new tokens in one decoder call against C positions: C = P for the whole prompt in
  one call (an empty cache feeds no slots; C = K for a fused decoder, whose GroupQueryAttention sizes
  a call's scores by the whole buffer, the first call's too: `Shapes.scores_span_slots`), C = K + s
  for a chunk after the first (it attends over every reserved slot, used or masked); decode steps are
  prefill(1, K + 1). Per layer
  PREFILL_ATTENTION score matrices heads x s x C, three MLP-wide and PREFILL_HIDDEN hidden-wide
  tensors of s tokens, and the slots repeated from KV heads to heads (grouped-query attention) for C
  positions; with float16 slots, also one layer's slots cast to float32 (build-engine --kv-dtype).
  The logits are the last position's only (schema 3).
  Fit to the full-size prefill of 4,064 tokens in one call (issue 14: +4.4 GB besides its logits and
  KV) and to the small preset's (benchmarks/RESULTS.md, memory).

Each ONNX Runtime session keeps its arena at its own peak unless it is shrunk after a run
(backends/onnxruntime_backend.py does so on the CPU), so the model adds vision and prefill rather
than taking the larger: an overestimate where the arena is shrunk. `plan()` starts from the whole
image and the whole prompt in one call each and halves the larger of the two activations until the
estimate fits.

A backend that can close a module's session and open it again when next used (`Backend.release`,
ONNX Runtime's) may also hold its modules a stage at a time (`Plan.staged`, `STAGES`): vision and
GSWA while the image is encoded, the decoder while the prompt is read and the answer decoded, the
embedding in both. Then the peak is the larger stage's, not the sum:

    staged peak = BASE + image(T) + max(weights(vision stage) + vision(v),
                                        weights(decoder stage) + kv(P + N) + max(prefill, decode))

at the cost of opening the decoder again per generation (3.6 s at full size on the dev CPU, against a
first token of minutes there; benchmarks/RESULTS.md). The plan holds every module when that fits, and
stages only when it does not; when even one view and MIN_PREFILL_CHUNK tokens do not fit, it
refuses in one line.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sleigh.errors import SleighError
from sleigh.runtime.kv_cache import KV_CHUNK, grown_capacity
from sleigh.runtime.multimodal import PIXEL_SHUFFLE_TOKENS

GB = 1024**3
BASE_BYTES = 160 * 1024**2  # python + numpy + onnxruntime + tokenizers, measured (benchmarks/RESULTS.md, memory)
# What the PyTorch reference (a checkpoint run) adds to it: `import torch` took RSS from 48 to 240 MB
# (torch 2.13 CPU, session 25); a checkpoint's budget counts it
TORCH_BASE_BYTES = 200 * 1024**2
FLOAT_BYTES = 4  # activations are fp32 on the CPU (KV slots: `Shapes.kv_itemsize`)
VISION_ATTENTION, VISION_HIDDEN = 3, 12  # tensors alive per vision layer (see the module docstring)
PREFILL_ATTENTION, PREFILL_HIDDEN = 3, 8
MIN_PREFILL_CHUNK = 64  # below this the decoder's per-call cost dominates; a budget that needs less refuses
SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
SMALLEST_ENGINE = ("an engine with INT8 vision, INT4 decoder weights and float16 KV slots, the smallest "
                   "(sleigh build-engine --precision int8 --llm-weights int4 --kv-dtype float16) if this is not one already")
HOW_TO_FIT = "fewer tiles (max_tiles), a shorter prompt or max_new_tokens, or "
SMALLER_THAN_TORCH = ("a package of this checkpoint (sleigh export), whose runtime needs no torch, and its smallest engine "
                      "(sleigh build-engine --precision int8 --llm-weights int4 --kv-dtype float16)")
# The modules each stage holds when a plan holds them a stage at a time (the module docstring)
STAGES = (("vision", "gswa", "embed"), ("decoder", "embed"))


def parse_size(text: str) -> int:
    """'2.5G', '900M', '2GiB', '3000000000' -> bytes (K, M, G, T are powers of 1024, as in `free -h`)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise SleighError(f"max_memory={text}", "not a memory size", "a positive size such as 2.5G, 900M or 3000000000")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).upper()])


def size_text(n: int) -> str:
    """Bytes as --max-memory reads them back exactly, in the largest unit that does so in at most two
    decimals ('2.5G' for 2684354560, '900M'; the bytes where none does): what a command a user is told
    to run shows."""
    for unit in ("T", "G", "M", "K"):
        value = n / SIZE_UNITS[unit]
        if value >= 1:
            for decimals in range(3):
                text = f"{value:.{decimals}f}{unit}"
                if parse_size(text) == n:
                    return text
    return str(n)


def gb(n: float, rounding: str = "nearest", decimals: int = 2) -> str:
    """Bytes in GB with two decimals; in MB or bytes where that would read 0.00 GB (`--max-memory 1K`).
    `rounding` "up" for what a run needs: a budget of the need as printed is enough."""
    step = {"nearest": round, "up": math.ceil}[rounding]
    for unit, name in ((GB, "GB"), (1024**2, "MB")):
        if n >= unit / 100:
            return f"{step(n / unit * 10**decimals) / 10**decimals:.{decimals}f} {name}"
    return f"{step(n)} bytes"


def budget_and_need(limit: int, need: int) -> tuple[str, str]:
    """A budget and the larger need it was refused for, printed with the decimals it takes for the two
    to differ (0.18 GB against 0.177 GB rounded up, 0.18 GB, would read as if it fitted)."""
    for decimals in range(2, 10):
        pair = gb(limit, decimals=decimals), gb(need, "up", decimals)
        if pair[0] != pair[1]:
            break
    return pair


def kv_slots(positions: int) -> int:
    """The slots a cache reserved for `positions` holds (runtime/kv_cache.SlotCache.reserve)."""
    return grown_capacity(max(positions, 1), KV_CHUNK)


@dataclass(frozen=True)
class Shapes:
    """The model's sizes that set its activations (from the config a package or checkpoint carries)."""

    vision_tokens: int  # N: patches + CLS per view
    vision_hidden: int
    vision_heads: int
    vision_mlp: int
    llm_hidden: int
    llm_heads: int
    llm_mlp: int
    layers: int
    kv_heads: int
    head_dim: int
    kv_itemsize: int = FLOAT_BYTES  # bytes per element of the cache slots (2: float16 slots)
    scores_span_slots: bool = False  # a call scores against every reserved slot (a fused decoder, in_place)

    @classmethod
    def from_contract(cls, contract, kv_dtype="float32") -> Shapes:
        """`kv_dtype`: the slots' dtype, as the backend allocates them (`backend.kv_dtype`)."""
        m, kv = contract.model, contract.kv_cache
        return cls(vision_tokens=m.vision_tokens, vision_hidden=m.vision_hidden_size, vision_heads=m.vision_num_heads,
                   vision_mlp=m.vision_intermediate_size, llm_hidden=m.hidden_size, llm_heads=m.num_heads,
                   llm_mlp=m.intermediate_size, layers=kv.num_layers, kv_heads=kv.num_kv_heads, head_dim=kv.head_dim,
                   kv_itemsize=np.dtype(kv_dtype).itemsize, scores_span_slots=kv.in_place)

    def kv_bytes(self, positions: int) -> int:
        """The slot cache reserved for `positions` (under a budget the Pipeline reserves them before the prefill: no growth)."""
        per_slot = 2 * self.layers * self.kv_heads * self.head_dim * self.kv_itemsize
        return per_slot * kv_slots(positions)

    def vision_bytes(self, views: int) -> int:
        N = self.vision_tokens
        per_view = VISION_ATTENTION * self.vision_heads * N * N + N * (2 * self.vision_mlp + VISION_HIDDEN * self.vision_hidden)
        return views * per_view * FLOAT_BYTES

    def image_bytes(self, views: int) -> int:
        """Every view's image embeddings, counted twice (see the module docstring)."""
        return 2 * views * ((self.vision_tokens - 1) // PIXEL_SHUFFLE_TOKENS) * self.llm_hidden * FLOAT_BYTES

    def prefill_bytes(self, tokens: int, context: int) -> int:
        s, C = tokens, max(context, tokens)
        per_layer = (PREFILL_ATTENTION * self.llm_heads * s * C + s * (3 * self.llm_mlp + PREFILL_HIDDEN * self.llm_hidden)
                     + 2 * self.llm_heads * C * self.head_dim)
        if self.kv_itemsize < FLOAT_BYTES:  # one layer's key and value slots cast to float32
            per_layer += 2 * self.kv_heads * C * self.head_dim
        return per_layer * FLOAT_BYTES


@dataclass(frozen=True)
class Plan:
    vision_chunk: int  # views per vision call
    prefill_chunk: int  # prompt tokens per decoder call
    estimate: int  # bytes, the model's peak with these chunks
    staged: bool = False  # the modules are held a stage at a time (STAGES)


def stage_bytes(sizes: dict[str, int]) -> tuple[int, ...]:
    """The weights each of STAGES holds, from each module's bytes (`module_sizes`)."""
    return tuple(sum(sizes.get(m, 0) for m in stage) for stage in STAGES)


def module_sizes(files: dict, resident: dict | None = None) -> dict[str, int]:
    """Each module's weights: its files' bytes, or what opening it added to the process where the
    backend measured that (`Backend.resident`) and found more. At full size (benchmarks/RESULTS.md,
    issue 14; GB as this module counts them) the INT4 decoder's 1.09 GB file is 1.51 GB resident once
    ONNX Runtime has prepacked its weights. Less than the files is not taken: a heap that earlier work
    left free serves a module without growing the process (a 0-byte measurement), and a mapped
    embedding table's rows become resident as prompts read them."""
    resident = resident or {}
    return {m: max(weights_bytes([f]), resident.get(m, 0)) for m, f in files.items()}


def resident_bytes(field: str = "VmRSS") -> int | None:
    """This process's resident set (Linux: /proc/self/status VmRSS; `field` VmHWM: its peak), None
    where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_bytes(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What this machine can still give this process: /proc/meminfo's MemAvailable, or less where a
    memory cgroup on the process's path leaves less (a container's or a systemd unit's limit; v2's
    memory.max or v1's memory.limit_in_bytes, at the process's own level or a parent's): the limit less
    what the cgroup uses, its inactive file cache (which the kernel reclaims first) not counted as used.
    None where neither can be read (not Linux)."""
    found = [limit - used for limit, used in _cgroup_limits(proc, cgroups)]
    try:
        with open(proc / "meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    return max(0, min(found)) if found else None


# v1's "no limit" is the largest page-aligned 64-bit value; anything this large is no limit
NO_CGROUP_LIMIT = 1 << 62
# (limit, usage, inactive file cache in memory.stat) of cgroup v2, then v1
CGROUP_FILES = {"v2": ("memory.max", "memory.current", "inactive_file"),
                "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


def _cgroup_limits(proc: Path, cgroups: Path) -> list[tuple[int, int]]:
    """(limit, bytes in use) of every memory cgroup with a limit on this process's path (/proc/self/cgroup)."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if line.startswith("0::"):
            base, (limit_file, used_file, cache_key) = cgroups, CGROUP_FILES["v2"]
        elif "memory" in controllers.split(","):
            base, (limit_file, used_file, cache_key) = cgroups / "memory", CGROUP_FILES["v1"]
        else:
            continue
        own = Path(path.lstrip("/"))
        for level in (own, *own.parents):  # its own cgroup, then each parent up to the mount's root
            limit, used = _read_int(base / level / limit_file), _read_int(base / level / used_file)
            if limit is None or used is None or limit >= NO_CGROUP_LIMIT:
                continue
            out.append((limit, max(0, used - _stat(base / level / "memory.stat", cache_key))))
    return out


def _read_int(path: Path) -> int | None:
    """A cgroup file's number; None where it is absent, unreadable or "max" (v2's no limit)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _stat(path: Path, key: str) -> int:
    """One field of a cgroup's memory.stat (0 where it cannot be read)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def weights_bytes(files) -> int:
    """Bytes of the module files and their external data (`x.onnx.data` beside `x.onnx`)."""
    total = 0
    for f in files:
        f = Path(f)
        for p in (f, f.with_name(f.name + ".data")):
            if p.is_file():
                total += p.stat().st_size
    return total


class MemoryBudget:
    """`max_memory`: the bytes a run may use, and the loaded model's fixed part. `stages`: the weights
    of each of STAGES (`stage_bytes`) when the backend can hold its modules a stage at a time."""

    def __init__(self, limit: int, shapes: Shapes, weights: int, stages: tuple[int, ...] | None = None,
                 torch: bool = False):
        """`torch`: the model runs on the PyTorch reference (a checkpoint), whose import the runtime counts."""
        self.limit, self.shapes, self.weights, self.stages = limit, shapes, weights, stages
        self.base = BASE_BYTES + (TORCH_BASE_BYTES if torch else 0)
        self.smaller = SMALLER_THAN_TORCH if torch else SMALLEST_ENGINE
        held = weights if stages is None else min(weights, max(stages))  # the least the model can hold at once
        if self.base + held > limit:
            what = f"{gb(held)} of weights{'' if held == weights else ' (its largest stage)'} + {gb(self.base)} of runtime"
            budget, need = budget_and_need(limit, self.base + held)
            raise SleighError(f"max_memory={budget}", f"the model alone needs {need} ({what})",
                              f"a budget above that, or {self.smaller}")

    def estimate(self, prompt_tokens: int, new_tokens: int, vision_chunk: int, prefill_chunk: int, views: int = 0,
                 staged: bool = False) -> int:
        """The model's peak (bytes) for one generation with `views` views run with these chunks."""
        sh = self.shapes
        decode = sh.prefill_bytes(1, kv_slots(prompt_tokens + new_tokens) + 1)
        vision = sh.vision_bytes(vision_chunk)
        decoder = sh.kv_bytes(prompt_tokens + new_tokens) + max(self.prefill_bytes(prompt_tokens, new_tokens, prefill_chunk), decode)
        if staged:
            return self.base + sh.image_bytes(views) + max(self.stages[0] + vision, self.stages[1] + decoder)
        return self.base + self.weights + sh.image_bytes(views) + vision + decoder

    def prefill_bytes(self, prompt_tokens: int, new_tokens: int, chunk: int) -> int:
        """The widest decoder call of a prefill in chunks of `chunk` tokens (see the module docstring)."""
        if chunk >= prompt_tokens:  # one call, on an empty cache
            slots = kv_slots(prompt_tokens + new_tokens) if self.shapes.scores_span_slots else prompt_tokens
            return self.shapes.prefill_bytes(prompt_tokens, slots)
        return self.shapes.prefill_bytes(chunk, kv_slots(prompt_tokens + new_tokens) + chunk)

    def plan(self, views: int, prompt_tokens: int, new_tokens: int) -> Plan:
        """Chunk sizes for one generation of `views` views and `prompt_tokens` + `new_tokens` tokens:
        every module held if that fits, else (where the backend can) a stage at a time."""
        plan = self._fit(views, prompt_tokens, new_tokens, staged=False)
        if plan is None and self.stages is not None:
            plan = self._fit(views, prompt_tokens, new_tokens, staged=True)
        if plan is None:
            self._refuse(views, prompt_tokens, new_tokens, self.stages is not None)
        return plan

    def _fit(self, views: int, prompt_tokens: int, new_tokens: int, staged: bool) -> Plan | None:
        """Halve the larger activation (views per vision call, tokens per decoder call) until the
        estimate fits; None when the smallest chunks do not."""
        sh = self.shapes
        v, s = views, prompt_tokens
        v_min, s_min = min(views, 1), min(prompt_tokens, MIN_PREFILL_CHUNK)
        while (estimate := self.estimate(prompt_tokens, new_tokens, v, s, views, staged)) > self.limit:
            vision_larger = sh.vision_bytes(v) >= self.prefill_bytes(prompt_tokens, new_tokens, s)
            if v > v_min and (vision_larger or s <= s_min):
                v = max(v_min, math.ceil(v / 2))
            elif s > s_min:
                s = max(s_min, s // 2)
            else:
                return None
        return Plan(v, s, estimate, staged)

    def _refuse(self, views: int, prompt_tokens: int, new_tokens: int, staged: bool):
        sh = self.shapes
        v, s = min(views, 1), min(prompt_tokens, MIN_PREFILL_CHUNK)
        need = self.estimate(prompt_tokens, new_tokens, v, s, views, staged)
        model = (f"model {gb(self.base + self.weights)}" if not staged else
                 f"model {gb(self.base + self.stages[1])} while decoding, its modules held a stage at a time")
        budget, need_text = budget_and_need(self.limit, need)
        raise SleighError(
            f"max_memory={budget}",
            f"{views} view{'s' if views != 1 else ''} and {prompt_tokens} + {new_tokens} tokens need about "
            f"{need_text} at the smallest chunks ({model}, KV cache "
            f"{gb(sh.kv_bytes(prompt_tokens + new_tokens))}, image embeddings {gb(sh.image_bytes(views))}, "
            f"vision at {v} view{'s' if v != 1 else ''} at once {gb(sh.vision_bytes(v))}, "
            f"prefill in chunks of {s} tokens {gb(self.prefill_bytes(prompt_tokens, new_tokens, s))})",
            f"a budget of at least {need_text}, or {HOW_TO_FIT}{self.smaller}")
