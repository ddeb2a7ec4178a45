"""Next-token choice from logits (numpy): greedy, temperature, top-k, top-p, repetition penalty.

Shared by every backend, so seeded sampling gives the same tokens whatever computed the logits
(up to the logits' own differences).

The distribution is transformers' (tests/runtime/test_sampling_hf.py compares it with its logits
processors): repetition penalty, then temperature, top-k, top-p, as `generate(do_sample=True)` chains
them. Where it differs, on purpose:
- temperature 0 means greedy (transformers refuses 0); greedy applies the penalty, as its greedy search does;
- top_k 0 and top_p 1 are off (transformers leaves those warpers out);
- a penalty never makes a finite logit infinite (transformers may overflow to inf);
- tokens tied at the top-p boundary keep the lower ids first (transformers' sort keeps either);
- `history` is whatever the caller passes: the pipeline passes the prompt's ids and the generated ones,
  as `generate(input_ids=...)` penalises them (InternVL's `chat` passes embeddings, so there
  transformers penalises only the generated tokens).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from sleigh.errors import SleighError


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        """Errors name the parameter (`temperature`); the CLI names its flag (`--temperature`)."""
        _number("temperature", self.temperature, lambda v: v >= 0, "a finite number >= 0 (0 = greedy)")
        _number("top_k", self.top_k, lambda v: v >= 0, "an integer >= 0 (0 = off)", integer=True)
        _number("top_p", self.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]")
        _number("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "a finite number > 0 (1 = off)")
        if self.seed is not None:
            _number("seed", self.seed, lambda v: v >= 0, "an integer >= 0 (unset: a random seed)", integer=True)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _number(name: str, value, ok, expected: str, integer: bool = False) -> None:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not (integer or _finite_float(value)) or not ok(value):
        raise SleighError(name, f"got {value!r}", expected)


def _finite_float(value: numbers.Real) -> bool:
    """`value` as a float is finite: an int past float's range (10**309) is not one (math.isfinite
    raises OverflowError on it)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


class Sampler:
    def __init__(self, options: SamplingOptions):
        self.options = options
        self.rng = np.random.default_rng(options.seed)
        # two float64 vocabulary-wide arrays, kept from pick to pick: a fresh one per pick cost more than
        # the arithmetic on it at InternVL2's 92,553 ids (its pages are mapped anew: RESULTS.md, "Greedy
        # picks"). So a Sampler is one generation's, never shared between threads (the Pipeline makes one
        # per generation).
        self._logits = self._probs = np.empty(0)

    def __call__(self, logits: np.ndarray, history: list[int] | np.ndarray = ()) -> int:
        """logits (V,) -> next token id. `history` holds the ids the repetition penalty applies to: a
        sequence of ids, or a TokenHistory (what a generation that appends to it should pass)."""
        o = self.options
        floats = isinstance(logits, np.ndarray) and logits.dtype.kind == "f"
        if o.greedy and o.repetition_penalty == 1.0 and floats:  # float32 orders as its float64 copy would
            return int(np.argmax(logits))  # no copy of the vocabulary per token (RESULTS.md, "Greedy picks")
        if self._logits.shape != np.shape(logits):
            self._logits, self._probs = np.empty(np.shape(logits)), np.empty(np.shape(logits))
        x = self._logits
        np.copyto(x, logits if floats else np.asarray(logits, np.float64))  # a float64 copy for the penalty and top-k
        if o.repetition_penalty != 1.0 and len(history):
            seen = history.distinct if isinstance(history, TokenHistory) else np.unique(np.asarray(history, dtype=np.int64))
            seen = seen[(seen >= 0) & (seen < x.shape[0])]
            with np.errstate(over="ignore"):
                penalised = np.where(x[seen] > 0, x[seen] / o.repetition_penalty, x[seen] * o.repetition_penalty)
            big = np.finfo(np.float64).max  # a tiny penalty (a reward) must not make a logit inf: inf - inf is nan
            x[seen] = np.clip(penalised, -big, big)
        if o.greedy:
            return int(np.argmax(x))
        # top-k and top-p rank the logits, not their shifted values or probabilities: those can round
        # distinct logits together (0 and 1e-200 have equal probabilities)
        if o.top_k and o.top_k < x.shape[0]:
            kth = np.partition(x, -o.top_k)[-o.top_k]
            x[x < kth] = -np.inf
        probs = self._probs
        with np.errstate(over="ignore"):  # shifted first: a tiny temperature gives -inf, never inf - inf
            np.divide(np.subtract(x, x.max(), out=probs), float(o.temperature), out=probs)
        np.exp(probs, out=probs)  # the best token's is exactly 1
        probs /= probs.sum()
        if o.top_p < 1.0:
            order, cum = nucleus(x, probs, o.top_p)
            keep = cum - probs[order] < o.top_p  # always keeps the most likely token
            mask = np.ones_like(probs, dtype=bool)
            mask[order[keep]] = False
            probs[mask] = 0.0
            probs /= probs.sum()
        return draw(self.rng, probs, out=x)  # the logits are spent: their array takes the cumulative sum


class TokenHistory:
    """The ids a repetition penalty applies to, as a generation gathers them (its prompt's, then each
    generated one). A pick reads their sorted distinct values (`distinct`), merged with the ids
    appended since the last read: it does not convert and sort the whole history again (RESULTS.md,
    "A repetition penalty's history"). Appending costs a list's append, so a generation without a
    penalty pays nothing for it."""

    def __init__(self, ids=()):
        self._distinct = np.empty(0, np.int64)
        self._pending = list(np.asarray(ids, dtype=np.int64).reshape(-1))
        self._count = len(self._pending)

    def append(self, token: int) -> None:
        self._pending.append(token)
        self._count += 1

    @property
    def distinct(self) -> np.ndarray:
        """Every id gathered, sorted, each once (int64, read-only)."""
        if len(self._pending) == 1:  # a decode step's: one id into its place
            token, d = int(self._pending.pop()), self._distinct
            i = int(d.searchsorted(token))
            if i == len(d) or d[i] != token:
                self._distinct = np.insert(d, i, token)
        elif self._pending:
            self._distinct = np.union1d(self._distinct, np.asarray(self._pending, dtype=np.int64))
            self._pending = []
        self._distinct.flags.writeable = False
        return self._distinct

    def __len__(self) -> int:
        """How many ids were gathered (repeats counted)."""
        return self._count


def draw(rng: np.random.Generator, probs: np.ndarray, out: np.ndarray) -> int:
    """`rng.choice(len(probs), p=probs)`'s inverse-CDF draw without its checks of `probs` (half of its
    0.6 ms at InternVL2's 92,553 ids): the same id for the same generator state
    (tests/runtime/test_sampling.py). No mass, or NaN, goes to `rng.choice`, which says what is wrong."""
    cdf = np.cumsum(probs, out=out)
    if not (np.isfinite(cdf[-1]) and cdf[-1] > 0):
        return int(rng.choice(probs.shape[0], p=probs))
    cdf /= cdf[-1]
    return int(cdf.searchsorted(rng.random(), side="right"))


# How many top ids `nucleus` ranks before it sorts the whole vocabulary: a trained model's top-p
# nucleus is mostly far smaller. One guess: on flat logits, where it falls short, further guesses cost
# more than the sort they would save (a review measured 18-37 ms against 11 ms with guesses doubled).
NUCLEUS_GUESS = 256


def nucleus(ranked: np.ndarray, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The ids in descending order of `ranked` (ties: lower id first) and the running sum of their
    `probs`, far enough that no later id is within top_p: the same leading part as a stable sort of
    the whole vocabulary gives, bit for bit, without sorting the whole of it where the top
    NUCLEUS_GUESS ids hold top_p of the mass (a sort of InternVL2's 92,553 ids took most of a sampled
    token's time: RESULTS.md, "Greedy picks")."""
    live = np.flatnonzero(ranked > -np.inf)  # top-k's -inf ids hold no mass, and slow a partition down
    n, k = len(live), NUCLEUS_GUESS
    if n and not np.isnan(ranked).any():  # (none: every logit -inf; NaN sorts last and partitions as it likes)
        values = ranked[live]
        ids = live if n <= k else live[values >= np.partition(values, n - k)[n - k]]  # the top k, and ties of the k-th
        order = ids[np.argsort(-ranked[ids], kind="stable")]
        cum = np.cumsum(probs[order])  # in order, one by one: the whole sort's running sum, as far as it goes
        # every later id's running sum less its own prob is at least cum[-1] less a rounding or two
        if cum[-1] > top_p + 1e-9:
            return order, cum
    order = np.argsort(-ranked, kind="stable")
    return order, np.cumsum(probs[order])
