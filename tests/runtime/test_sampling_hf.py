"""The Sampler's distribution against a reference we did not write: transformers' own logits processors
(RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper), chained
in the order and under the skip rules of `GenerationMixin._get_logits_processor` (penalty, temperature,
top-k, top-p; top_k 0 and top_p 1 leave their warper out). Then what seeded draws may and may not do.

Where Sleigh differs from transformers on purpose (sampling.py's docstring says so too):
- temperature 0 means greedy (transformers refuses 0 and asks for do_sample=False); greedy still applies
  the repetition penalty, as transformers' greedy search does;
- a penalty never turns a finite logit into inf (transformers' float32 may overflow): only at extremes
  this file does not draw;
- tokens tied at the top-p boundary: Sleigh keeps the lower ids first (a stable sort), transformers'
  unstable sort keeps either; the comparisons below draw no ties and no cumulative sum at top_p.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sleigh.runtime import sampling
from sleigh.runtime.sampling import Sampler, SamplingOptions

torch = pytest.importorskip("torch")
logits_process = pytest.importorskip("transformers.generation.logits_process")


def sleigh_probs(opts: SamplingOptions, logits: np.ndarray, history) -> np.ndarray:
    """The distribution the Sampler draws from (what it hands `sampling.draw`, stood in for here)."""
    seen = {}

    def spy(rng, probs, out):
        seen["p"] = np.array(probs, dtype=np.float64)
        return int(np.argmax(probs))

    real, sampling.draw = sampling.draw, spy
    try:
        Sampler(opts)(logits, history)
    finally:
        sampling.draw = real
    return seen["p"]


def hf_scores(opts: SamplingOptions, logits: np.ndarray, history) -> torch.Tensor:
    """transformers' processed scores (float64), processors as `generate(do_sample=True)` chains them."""
    lp = logits_process
    procs = lp.LogitsProcessorList()
    if opts.repetition_penalty != 1.0:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(float(opts.repetition_penalty)))
    if opts.temperature not in (0.0, 1.0):
        procs.append(lp.TemperatureLogitsWarper(float(opts.temperature)))
    if opts.top_k != 0:
        procs.append(lp.TopKLogitsWarper(top_k=int(opts.top_k)))
    if opts.top_p < 1.0:
        procs.append(lp.TopPLogitsWarper(top_p=float(opts.top_p)))
    input_ids = torch.tensor([list(history)], dtype=torch.long).reshape(1, -1)  # (1, T), T may be 0
    return procs(input_ids, torch.tensor(logits, dtype=torch.float64)[None])[0]


def hf_probs(opts: SamplingOptions, logits: np.ndarray, history) -> np.ndarray:
    return torch.softmax(hf_scores(opts, logits, history), dim=-1).numpy()


def boundary_safe(opts: SamplingOptions, logits: np.ndarray, history) -> bool:
    """No ties among the logits after the penalty (Sleigh's top-k input) or after the temperature too
    (transformers'), and no prefix of the sorted distribution whose mass lies within 1e-9 of top_p:
    where transformers' and Sleigh's choices may both be right."""
    for scaled in (SamplingOptions(repetition_penalty=opts.repetition_penalty), replace(opts, top_k=0, top_p=1.0)):
        x = hf_scores(scaled, logits, history).numpy()
        if len(np.unique(x)) != len(x):
            return False
    if opts.top_p < 1.0:
        temp_only = SamplingOptions(temperature=opts.temperature or 1.0, top_k=opts.top_k,
                                    repetition_penalty=opts.repetition_penalty)
        p = np.sort(hf_probs(temp_only, logits, history))[::-1]
        if np.min(np.abs(np.cumsum(p) - opts.top_p)) < 1e-9:
            return False
    return True


VOCAB = st.integers(2, 40)


@st.composite
def cases(draw):
    n = draw(VOCAB)
    logits = np.asarray(draw(st.lists(st.floats(-30, 30, allow_nan=False), min_size=n, max_size=n)))
    opts = SamplingOptions(
        temperature=draw(st.floats(0.05, 5.0)),
        top_k=draw(st.one_of(st.just(0), st.integers(1, n + 3))),
        top_p=draw(st.one_of(st.just(1.0), st.floats(0.01, 1.0))),
        repetition_penalty=draw(st.one_of(st.just(1.0), st.floats(0.2, 5.0))),
    )
    history = draw(st.lists(st.integers(0, n - 1), max_size=8))
    return opts, logits, history


@settings(max_examples=150, deadline=None)
@given(cases())
def test_distribution_equals_transformers_processors(case):
    opts, logits, history = case
    assume(boundary_safe(opts, logits, history))
    ours, theirs = sleigh_probs(opts, logits, history), hf_probs(opts, logits, history)
    np.testing.assert_array_equal(ours > 0, theirs > 0)  # the same tokens can be drawn
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_greedy_is_the_argmax_of_transformers_penalised_scores(case):
    opts, logits, history = case
    assume(boundary_safe(opts, logits, history))
    greedy = SamplingOptions(repetition_penalty=opts.repetition_penalty, top_k=opts.top_k, top_p=opts.top_p)
    assert Sampler(greedy)(logits, history) == int(torch.argmax(hf_scores(greedy, logits, history)))


@pytest.mark.parametrize("logits, history, penalty", [
    ([2.0, -2.0, 0.0, 1.0], [0, 1, 2], 2.0),  # positive divided, negative multiplied, zero stays zero
    ([2.0, -2.0, 0.0, 1.0], [0, 0, 1, 1], 0.5),  # a penalty below 1 rewards; repeats count once
    ([3.0, 1.0, 0.5], [], 1.5),  # nothing seen: nothing changes
])
def test_repetition_penalty_matches_transformers_on_hand_picked_cases(logits, history, penalty):
    opts = SamplingOptions(temperature=1.0, repetition_penalty=penalty)
    x = np.asarray(logits)
    np.testing.assert_allclose(sleigh_probs(opts, x, history), hf_probs(opts, x, history), rtol=1e-12)


def test_top_k_keeps_ties_at_the_kth_logit_as_transformers_does():
    x = np.array([3.0, 1.0, 2.0, 2.0, 0.0])
    opts = SamplingOptions(temperature=1.0, top_k=2)
    ours, theirs = sleigh_probs(opts, x, []), hf_probs(opts, x, [])
    assert set(np.flatnonzero(ours)) == set(np.flatnonzero(theirs)) == {0, 2, 3}
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_top_p_ties_at_the_boundary_keep_the_lower_ids():
    """The one place Sleigh picks where transformers leaves it to its sort: 3 tied tokens, 2 fit."""
    x = np.log(np.array([0.4, 0.2, 0.2, 0.2]))
    p = sleigh_probs(SamplingOptions(temperature=1.0, top_p=0.7), x, [])
    assert list(np.flatnonzero(p)) == [0, 1, 2]  # the mass before token 2 is 0.6 < 0.7; before 3 it is 0.8
    assert np.count_nonzero(hf_probs(SamplingOptions(temperature=1.0, top_p=0.7), x, [])) == 3


# -- seeded draws ----------------------------------------------------------------------------------

DRAWS = 3000


def draws(opts: SamplingOptions, logits: np.ndarray, history=()) -> np.ndarray:
    sampler = Sampler(opts)
    return np.array([sampler(logits, history) for _ in range(DRAWS)])


@pytest.mark.parametrize("top_k", [1, 3, 7])
def test_seeded_draws_never_leave_the_top_k(top_k):
    x = np.random.default_rng(top_k).normal(size=50)
    allowed = set(np.argsort(-x)[:top_k])  # no ties among normal draws
    got = set(draws(SamplingOptions(temperature=2.0, top_k=top_k, seed=11), x).tolist())
    assert got <= allowed
    assert len(got) == top_k  # at temperature 2 every one of them turns up in 3000 draws


def test_seeded_draws_never_leave_transformers_nucleus():
    x = np.random.default_rng(5).normal(size=30) * 2
    opts = SamplingOptions(temperature=1.0, top_p=0.8, seed=3)
    nucleus = set(np.flatnonzero(hf_probs(opts, x, [])))
    got = set(draws(opts, x).tolist())
    assert got <= nucleus and len(nucleus) < len(x)


def test_top_p_one_and_top_k_zero_keep_every_token():
    x = np.array([0.5, 0.0, -0.5, -1.0, 0.2])
    opts = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, seed=0)
    np.testing.assert_allclose(sleigh_probs(opts, x, []), torch.softmax(torch.tensor(x), -1).numpy(), rtol=1e-12)
    assert set(draws(opts, x).tolist()) == set(range(len(x)))


def test_draw_frequencies_follow_transformers_distribution():
    """All four options at once; each token's share within 5 standard deviations of its probability."""
    x = np.random.default_rng(2).normal(size=12) * 1.5
    history = [0, 3, 3, 7]
    opts = SamplingOptions(temperature=0.8, top_k=6, top_p=0.95, repetition_penalty=1.3, seed=4)
    want = hf_probs(opts, x, history)
    share = np.bincount(draws(opts, x, history), minlength=len(x)) / DRAWS
    sd = np.sqrt(want * (1 - want) / DRAWS)
    assert np.all(np.abs(share - want) <= 5 * sd + 1e-12), (share, want)
    assert np.all(share[want == 0] == 0)
