"""`cache_attention` (attention over cache slots and new keys without concatenating them) against
the textbook form: concatenate the keys, repeat the KV heads, one softmax over everything."""

import pytest
import torch

from sleigh.sleighvl.llm import attention_logit_bias, cache_attention


def textbook(q, k, v, past_k, past_v, mask):
    """q (B, nh, S, hd); everything concatenated; mask (B, 1, S, C+S) additive."""
    groups = q.shape[1] // k.shape[1]
    keys = torch.cat([past_k, k], dim=2).repeat_interleave(groups, dim=1)
    values = torch.cat([past_v, v], dim=2).repeat_interleave(groups, dim=1)
    probs = ((q @ keys.transpose(2, 3)) / q.shape[-1] ** 0.5 + mask).softmax(-1)
    B, nh, S, hd = q.shape
    return (probs @ values).transpose(1, 2).reshape(B, S, nh * hd)


def split_mask(mask, C):
    return mask[..., :C], torch.cat([mask[..., C:], torch.zeros_like(mask[..., :1])], dim=-1)


@pytest.mark.parametrize("B,S,C,unused,scale", [(1, 6, 0, 0, 1.0), (1, 1, 9, 3, 1.0), (2, 4, 7, 2, 1.0),
                                                 (1, 1, 12, 0, 40.0), (2, 5, 3, 0, 1.0)])
def test_equals_one_softmax_over_all_keys(B, S, C, unused, scale):
    g = torch.Generator().manual_seed(B * 100 + S * 10 + C)
    nh, nkv, hd = 6, 2, 8
    q = scale * torch.randn(B, nh, S, hd, generator=g)  # scale 40: logits in the hundreds
    k, v = torch.randn(B, nkv, S, hd, generator=g), torch.randn(B, nkv, S, hd, generator=g)
    past_k, past_v = torch.randn(B, nkv, C, hd, generator=g), torch.randn(B, nkv, C, hd, generator=g)
    keep = torch.ones(B, C + S, dtype=torch.int64)
    if unused:  # unused slots at the end hold garbage and are masked
        keep[:, C - unused:C] = 0
        past_k[:, :, C - unused:] = 1e4 * torch.randn(B, nkv, unused, hd, generator=g)
        past_v[:, :, C - unused:] = 1e4
    if B == 2 and C > 2:
        keep[1, :2] = 0  # left padding of row 1 in the slots
    bias = 0.3 * torch.randn(B, C + S, generator=g)  # GSWA-like log-weights
    mask = attention_logit_bias(keep, bias, S, torch.float32)
    got = cache_attention(q, k, v, past_k, past_v, *split_mask(mask, C))
    ref = textbook(q.double(), k.double(), v.double(), past_k.double(), past_v.double(), mask.double())
    assert torch.isfinite(got).all()
    assert (got.double() - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())


def test_empty_cache_contributes_nothing():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 2, 3, 8, generator=g)
    mask = attention_logit_bias(torch.ones(1, 3, dtype=torch.int64), torch.zeros(1, 3), 3, torch.float32)
    empty = torch.zeros(1, 2, 0, 8)
    got = cache_attention(q, k, v, empty, empty, *split_mask(mask, 0))
    # with one fully masked slot of garbage the answer is the same
    slot_mask = attention_logit_bias(torch.tensor([[0, 1, 1, 1]]), torch.zeros(1, 4), 3, torch.float32)
    junk = torch.full((1, 2, 1, 8), 7.0)
    masked = cache_attention(q, k, v, junk, junk, *split_mask(slot_mask, 1))
    assert torch.allclose(got, masked, atol=1e-6)
    assert torch.allclose(got, textbook(q, k, v, empty, empty, mask), atol=1e-5)
