"""SamplingOptions refuses what is not a number it can use (library errors name the parameter), and
the Sampler returns a valid token for every option it accepts, extreme ones included."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sleigh.errors import SleighError
from sleigh.runtime.sampling import Sampler, SamplingOptions

NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("field, value", [
    *[("temperature", v) for v in (*NON_FINITE, -0.1, "0.5", None, 10**400)],  # 10**400: no float holds it
    *[("top_p", v) for v in (*NON_FINITE, 0.0, 1.5, -1)],
    *[("repetition_penalty", v) for v in (*NON_FINITE, 0.0, -1.0)],
    *[("repetition_penalty", 10**400)],
    *[("top_k", v) for v in (-1, 2.5, True, -10**400)],
    *[("seed", v) for v in (-1, 1.5, "7", -10**400)],
])
def test_bad_option_is_a_user_error_naming_the_parameter(field, value):
    with pytest.raises(SleighError) as info:
        SamplingOptions(**{field: value})
    message = str(info.value)
    assert message.startswith(f"{field} | got ") and "Expected:" in message
    assert "--" not in message.split(" | ")[0]  # a library error names the parameter, not a CLI flag


def test_good_options_are_kept():
    o = SamplingOptions(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.2, seed=2**70)
    assert (o.temperature, o.top_k, o.top_p, o.repetition_penalty, o.seed) == (0.7, 5, 0.9, 1.2, 2**70)
    assert SamplingOptions(seed=np.int64(3)).seed == 3 and SamplingOptions(temperature=np.float32(0.5)).temperature == 0.5
    huge = SamplingOptions(temperature=1.0, top_k=10**400, seed=10**400)  # ints past float's range (a server's 500 once)
    assert Sampler(huge)(np.array([0.0, 1.0, 2.0], np.float32)) in (0, 1, 2)


def test_sampling_follows_the_softmax():
    logits = np.log(np.array([1.0, 3.0]))  # softmax at T=1: [0.25, 0.75]
    sampler = Sampler(SamplingOptions(temperature=1.0, seed=0))
    share = np.mean([sampler(logits) for _ in range(4000)])
    assert abs(share - 0.75) < 0.03, share  # 4.4 standard deviations


@settings(max_examples=300, deadline=None)
@given(
    logits=st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=12),
    temperature=st.one_of(st.just(0.0), st.floats(1e-300, 1e300)),
    top_k=st.integers(0, 20),
    top_p=st.floats(1e-9, 1.0),
    penalty=st.floats(1e-300, 1e300),
    history=st.lists(st.integers(-3, 15), max_size=6),
    seed=st.integers(0, 2**64),
)
def test_every_accepted_option_gives_a_valid_token(logits, temperature, top_k, top_p, penalty, history, seed):
    opts = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty, seed=seed)
    x = np.asarray(logits)
    token = Sampler(opts)(x, history)
    assert 0 <= token < len(logits)
    assert token == Sampler(opts)(x, history)  # the same seed, the same token
    if temperature < 1e-200 and penalty == 1.0:
        assert x[token] == x.max()  # a vanishing temperature is greedy, not nan


@settings(max_examples=200, deadline=None)
@given(logits=st.lists(st.floats(-3, 3, width=16), min_size=1, max_size=40), dtype=st.sampled_from([np.float16, np.float32]))
def test_a_greedy_pick_reads_the_logits_as_they_are_and_picks_what_float64_would(logits, dtype):
    """Greedy without a penalty takes the first largest logit of the array it is given, with no float64
    copy: the same id as the float64 path (a penalty of 1 + 1e-12 takes it, and changes no logit of
    this range), ties included (float16 values repeat often)."""
    x = np.asarray(logits, dtype)
    fast, copied = Sampler(SamplingOptions()), Sampler(SamplingOptions(repetition_penalty=1 + 1e-12))
    assert fast(x) == copied(x, range(len(logits))) == int(np.argmax(x.astype(np.float64)))


@settings(max_examples=200, deadline=None)
@given(size=st.sampled_from([2, 300, 2100, 5000, 20000]), spread=st.sampled_from([0.01, 1.0, 8.0]), repeats=st.booleans(),
       masked=st.booleans(), boundary=st.sampled_from([0, 255, 256, 2047, 2048, 4999, -1]), nudge=st.sampled_from([-1, 0, 1]),
       seed=st.integers(0, 2**32))
def test_nucleus_gives_the_whole_stable_sorts_order_and_running_sum(size, spread, repeats, masked, boundary, nudge, seed):
    """`nucleus` ranks only the top ids where they hold top_p of the mass: a prefix of numpy's stable
    sort of every id and of its running sum, bit for bit, and the same ids kept, with ties (values
    repeated), top-k's -inf ids, and top_p placed on a guess's boundary, one ulp either side."""
    from sleigh.runtime.sampling import nucleus

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(size) * spread
    if repeats:
        x = np.round(x, 1)
    if masked:
        x[rng.random(size) < 0.7] = -np.inf
        x[rng.integers(size)] = 1.0
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    whole = np.argsort(-x, kind="stable")
    running = np.cumsum(probs[whole])
    top_p = running[min(boundary, size - 1)]
    top_p = float(np.clip(top_p + nudge * np.spacing(top_p), 1e-12, 1.0))
    order, cum = nucleus(x, probs, top_p)
    n = len(order)
    np.testing.assert_array_equal(order, whole[:n])
    np.testing.assert_array_equal(cum, running[:n])
    keep = running - probs[whole] < top_p
    assert set(whole[keep]) == set(order[cum - probs[order] < top_p])


def test_a_sampler_used_again_on_another_vocabulary_or_dtype_picks_as_a_fresh_one():
    """The Sampler keeps its float64 work arrays between picks: a pick on another size or dtype of
    logits gives what a Sampler without kept arrays gives, for the same seed."""
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal(n).astype(dtype) for n, dtype in ((50, np.float32), (9, np.float16), (50, np.float64), (9, np.float32))]
    for options in (SamplingOptions(temperature=0.8, top_p=0.9, seed=3), SamplingOptions(repetition_penalty=1.3)):
        kept, fresh = Sampler(options), Sampler(options)
        for x in logits * 3:
            fresh._logits = fresh._probs = np.empty(0)
            assert kept(x, [1, 2]) == fresh(x, [1, 2])
    assert Sampler(SamplingOptions())([1.0, 3.0, 2.0]) == 1  # a list, as the float64 path reads it


def test_a_draw_is_the_id_numpys_choice_gives_and_no_mass_is_refused_as_it_refuses():
    """`draw` skips `Generator.choice`'s checks of the probabilities but draws as it does: the same id
    for the same generator state, over many draws and sizes; probabilities that are NaN (every logit
    -inf) raise choice's own error, as the Sampler always did."""
    from sleigh.runtime.sampling import draw

    for size, seed in ((1, 0), (7, 1), (300, 2), (92553, 3)):
        probs = np.random.default_rng(seed).random(size) ** 4
        probs /= probs.sum()
        ours, numpys, out = np.random.default_rng(seed), np.random.default_rng(seed), np.empty(size)
        assert [draw(ours, probs, out) for _ in range(400)] == [int(numpys.choice(size, p=probs)) for _ in range(400)]
    with np.errstate(invalid="ignore"), pytest.raises(ValueError, match="NaN"):  # -inf - -inf
        Sampler(SamplingOptions(temperature=1.0, seed=0))(np.full(5, -np.inf))


@settings(max_examples=200, deadline=None)
@given(prompt=st.lists(st.integers(-2, 40), max_size=30), steps=st.lists(st.lists(st.integers(-2, 40), max_size=3), max_size=12),
       penalty=st.sampled_from([0.5, 1.3, 2.0]), temperature=st.sampled_from([0.0, 0.9]), seed=st.integers(0, 2**32))
def test_a_token_history_penalises_as_the_list_of_every_id_does(prompt, steps, penalty, temperature, seed):
    """The Pipeline's TokenHistory (distinct ids merged as they come) gives the picks of the plain list
    of every id, read after none, one or several appends (ids repeated, negative or past the vocabulary)."""
    from sleigh.runtime.sampling import TokenHistory

    options = SamplingOptions(temperature=temperature, repetition_penalty=penalty, seed=seed)
    logits = np.random.default_rng(seed).standard_normal(37).astype(np.float32)
    plain, kept = Sampler(options), Sampler(options)
    ids, history = list(prompt), TokenHistory(prompt)
    for appended in [*steps, []]:
        assert plain(logits, ids) == kept(logits, history)
        np.testing.assert_array_equal(history.distinct, np.unique(np.asarray(ids, dtype=np.int64)))
        for token in appended:
            ids.append(token)
            history.append(token)
        assert len(history) == len(ids)
    assert not history.distinct.flags.writeable
    np.testing.assert_array_equal(TokenHistory(np.asarray([prompt], np.int64)).distinct, np.unique(np.asarray(prompt, np.int64)))
