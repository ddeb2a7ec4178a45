"""`cache_attention` (attention over cache slots and new keys without concatenating them) against
the textbook form, written here from scratch: concatenate the keys, repeat the KV heads, one causal
softmax over everything with -inf for masked keys."""

import pytest
import torch

from sleigh.sleighvl.llm import cache_attention, slot_terms


def textbook(q, k, v, past_k, past_v, keep, bias):
    """q (B, nh, S, hd); keep/bias (B, C+S) over the slots then the new positions."""
    B, nh, S, hd = q.shape
    C = past_k.shape[2]
    groups = nh // k.shape[1]
    keys = torch.cat([past_k, k], dim=2).repeat_interleave(groups, dim=1)
    values = torch.cat([past_v, v], dim=2).repeat_interleave(groups, dim=1)
    logits = (q @ keys.transpose(2, 3)) / hd ** 0.5 + bias[:, None, None, :]  # (B, nh, S, C+S)
    allowed = torch.ones(B, S, C + S, dtype=torch.bool)
    allowed[:, :, C:] = torch.ones(S, S).tril().bool()  # a new position sees itself and earlier ones
    allowed &= keep[:, None, :].bool()
    probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
    return (probs @ values).transpose(1, 2).reshape(B, S, nh * hd)


def attend(q, k, v, past_k, past_v, keep, bias):
    S, nkv = q.shape[2], k.shape[1]
    terms = slot_terms(keep, bias, S, q.dtype, nkv, q.shape[1] // nkv, q.shape[-1])
    return cache_attention(q, k, v, past_k, past_v, terms)


@pytest.mark.parametrize("B,S,C,unused,scale", [(1, 6, 0, 0, 1.0), (1, 1, 9, 3, 1.0), (2, 4, 7, 2, 1.0),
                                                 (1, 1, 12, 0, 40.0), (2, 5, 3, 0, 1.0), (1, 3, 5, 1, 40.0)])
def test_equals_one_softmax_over_all_keys(B, S, C, unused, scale):
    g = torch.Generator().manual_seed(B * 100 + S * 10 + C)
    nh, nkv, hd = 6, 2, 8
    q = scale * torch.randn(B, nh, S, hd, generator=g)  # scale 40: logits in the hundreds
    k, v = torch.randn(B, nkv, S, hd, generator=g), torch.randn(B, nkv, S, hd, generator=g)
    past_k, past_v = torch.randn(B, nkv, C, hd, generator=g), torch.randn(B, nkv, C, hd, generator=g)
    keep = torch.ones(B, C + S, dtype=torch.int64)
    if unused:  # unused slots at the end hold stale keys (a larger scale than the real ones) and huge values, masked
        keep[:, C - unused:C] = 0
        past_k[:, :, C - unused:] = 10 * torch.randn(B, nkv, unused, hd, generator=g)
        past_v[:, :, C - unused:] = 1e4
    if B == 2 and C > 2:
        keep[1, :2] = 0  # left padding of row 1 in the slots
    bias = 0.3 * torch.randn(B, C + S, generator=g)  # GSWA-like log-weights
    got = attend(q, k, v, past_k, past_v, keep, bias)
    ref = textbook(q.double(), k.double(), v.double(), past_k.double(), past_v.double(), keep, bias.double())
    assert torch.isfinite(got).all()
    assert (got.double() - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())


def test_empty_cache_contributes_nothing():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 2, 3, 8, generator=g)
    empty = torch.zeros(1, 2, 0, 8)
    got = attend(q, k, v, empty, empty, torch.ones(1, 3, dtype=torch.int64), torch.zeros(1, 3))
    junk = torch.full((1, 2, 1, 8), 7.0)  # one masked slot of garbage: the same answer
    masked = attend(q, k, v, junk, junk, torch.tensor([[0, 1, 1, 1]]), torch.zeros(1, 4))
    assert torch.allclose(got, masked, atol=1e-6)
    assert torch.allclose(got, textbook(q, k, v, empty, empty, torch.ones(1, 3), torch.zeros(1, 3)), atol=1e-5)
