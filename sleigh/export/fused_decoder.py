"""The decoder as ONNX Runtime's fused operators, written node by node from the reference's weights
(`sleigh export --decoder fused`): the form that runs fastest on ONNX Runtime (benchmarks/RESULTS.md,
"A fused decoder"). TensorRT reads only the standard form (`modules.decoder_spec`).

Per layer: SkipSimplifiedLayerNormalization (the residual add and RMSNorm in one node), one MatMul
for q, k and v, one GroupQueryAttention that takes them packed and turns q and k itself (rotate-half,
at the given position_ids; RotaryEmbedding nodes on split q and k where heads are not a multiple of
ROTARY_INSIDE_HEAD_MULTIPLE wide, and in the weighted-values variant), the output MatMul, and the MLP
with one MatMul for gate and up. The LM head reads the last position only.

The decoder's inputs and outputs keep the standard form's names, with one input more and one change
of meaning (package schema 6). `input_ids` (B, S) brings the token embedding into the decoder: a
decode step gives its token ids and a (1, 1, D) row of zeros as `inputs_embeds`, so no embed session
runs per token and on a GPU the token's embedding never crosses to the host; a prefill gives the embed
module's `inputs_embeds` (image rows merged) and `input_ids` [[-1]] ("no token here"). The change of
meaning (manifest `kv_cache.form` "shared", README "The decoder's KV cache"): each
`past_key_values.*` input is the cache's whole buffer (B, KV, capacity, hd), positions 0..P-1 in
use, and the `new_key_values.*` output of the same index is that same buffer with the S new
positions written at P..P+S-1, in place when the caller binds one array to both (the runtime does).
attention_mask and attention_bias cover exactly the P+S positions in use, so the graph takes P+S
from attention_mask's width, as GroupQueryAttention's total_sequence_length, with seqlens_k = P+S-1
for every row: every row has the same length, and padding is masked through the bias, as in the
standard form (MASKED_LOGIT where attention_mask is 0, GSWA's log-weights elsewhere).

GroupQueryAttention refuses a prompt of more than one position after a cache when the batch is
larger than one (onnxruntime 1.22-1.32); the runtime feeds such a step row by row. Where it turns q
and k itself, it turns a prompt into an empty cache at contiguous positions from the first row's first
(runtime/manifest.ROTARY_INSIDE_HEAD_MULTIPLE).

The weighted-values variant (`sleigh export --decoder fused-cuda`, kv_cache.form "weighted") is the
one that can run on ONNX Runtime's CUDA provider, whose GroupQueryAttention takes no attention_bias
(runtime/backends/onnxruntime_backend.FUSED_NOT_ON_CUDA). It gives the same logits without a bias:
softmax(s + log w) v = sum(p w v) / sum(p w) with p = softmax(s), so each position's value row is
kept as (w v, w, 0...) in a head padded to `padded_head_dim` (queries and keys padded with zeros in
each rotate-half half, which leaves every q.k unchanged), and the attention's output is divided by its
weight column. w is exp(attention_bias) where attention_mask is 1 and 0 where it is 0, fixed when
the position is written. Its seqlens_k comes from the mask's contents (the last position in use) and
the new positions' weights are gathered there, so a decode step may also be given a mask and bias
as wide as the buffers (zeros past the positions in use): the static shapes of a CUDA graph
(onnxruntime_backend's replayed decode steps). On the CPU it decodes 6-11 % slower than the bias form
(benchmarks/RESULTS.md), so `fused` stays the CPU's form.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sleigh.onnx_files import EXTERNAL_DATA_BYTES, ORT_DOMAIN as MS
from sleigh.runtime.kv_cache import LOGITS, NEW, PAST
from sleigh.runtime.manifest import kv_names, rotary_in_attention
from sleigh.sleighvl.llm import LLM, MASKED_LOGIT, rope_cos_sin

# onnxruntime 1.22 (the oldest tested) reads IR version 10 at most
IR_VERSION = 10


def rope_caches(head_dim: int, theta: float, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (positions, hd/2): the reference's rotate-half angles (llm.rope_cos_sin) at every
    position, one half (the other repeats it), as RotaryEmbedding's caches take them."""
    import torch

    cos, sin = rope_cos_sin(torch.arange(positions)[None], head_dim, theta, torch.float32)  # (1, 1, P, hd)
    return cos[0, 0, :, :head_dim // 2].numpy(), sin[0, 0, :, :head_dim // 2].numpy()


# Weights are written to the external data file at offsets aligned like this (page-aligned tensors can be mapped)
DATA_ALIGN = 4096


def padded_head_dim(head_dim: int) -> int:
    """The weighted-values form's head width: the head's own dims, one column for the weight, zeros to
    the next multiple of 8 (the CUDA attention kernels' granularity)."""
    return -(-(head_dim + 1) // 8) * 8


def _is_key(name: str) -> bool:
    return name.endswith(".key")


def pad_rotary_head(x: np.ndarray) -> np.ndarray:
    """(..., hd) -> (..., padded_head_dim(hd)): each rotate-half half followed by zeros (a query or key
    head, or the columns of its projection), so RotaryEmbedding still pairs dim i with i + hd/2."""
    hd = x.shape[-1]
    out = np.zeros((*x.shape[:-1], 2, padded_head_dim(hd) // 2), x.dtype)
    out[..., :hd // 2] = x.reshape(*x.shape[:-1], 2, hd // 2)
    return out.reshape(*x.shape[:-1], padded_head_dim(hd))  # not -1: a cache of 0 positions has no size to divide


def pad_value_head(x: np.ndarray) -> np.ndarray:
    """(..., hd) -> (..., padded_head_dim(hd)): a value head's dims, then zeros (the weight column's place first)."""
    hd = x.shape[-1]
    return np.concatenate([x, np.zeros((*x.shape[:-1], padded_head_dim(hd) - hd), x.dtype)], axis=-1)


def to_weighted_cache(name: str, rows: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The reference's keys or values of the cache tensor `name` (B, KV, P, hd) as the weighted-values
    form keeps them (B, KV, P, hp): keys with each rotate-half half padded with zeros, values as
    (w v, w, 0...) with `weights` (B, P) the positions' w."""
    if _is_key(name):
        return pad_rotary_head(rows)
    w = weights[:, None, :, None].astype(rows.dtype)
    out = pad_value_head(rows * w)
    out[..., rows.shape[-1]:rows.shape[-1] + 1] = w
    return out


def from_weighted_cache(name: str, rows: np.ndarray, head_dim: int) -> np.ndarray:
    """`to_weighted_cache` undone: (B, KV, P, hp) -> (B, KV, P, hd); a value row of weight 0 (a masked
    position) comes back as zeros."""
    B, KV, P, hp = rows.shape
    if _is_key(name):
        return np.ascontiguousarray(rows.reshape(B, KV, P, 2, hp // 2)[..., :head_dim // 2].reshape(B, KV, P, head_dim))
    w = rows[..., head_dim:head_dim + 1]
    return np.where(w != 0, rows[..., :head_dim] / np.where(w != 0, w, 1), 0).astype(rows.dtype)


def build(llm: LLM, opset: int, data=None, data_name: str = "", weighted_values: bool = False):
    """-> the fused decoder's onnx.ModelProto. Its weights are inside it, or, given `data` (a binary
    file open for writing, named `data_name` beside the model), written there one tensor at a time
    as they are made, so at full size no copy of all the weights is ever held. `weighted_values`: the
    variant without an attention bias (module docstring), kv_cache.form "weighted"."""
    from onnx import TensorProto, helper, numpy_helper

    cfg = llm.cfg
    L, nh, nkv, hd, D = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    rotary_inside = rotary_in_attention("weighted" if weighted_values else "shared", hd)
    nodes, inits = [], []

    def weight(name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if data is None or array.size < 1024:
            inits.append(numpy_helper.from_array(array, name))
            return name
        data.write(b"\0" * (-data.tell() % DATA_ALIGN))
        offset = data.tell()
        data.write(array.tobytes())
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
            t.external_data.add(key=key, value=value)
        inits.append(t)
        return name

    def const(name: str, value, dtype) -> str:
        inits.append(numpy_helper.from_array(np.array(value, dtype), name))
        return name

    def linear_t(*modules) -> np.ndarray:
        """nn.Linear weights (out, in) -> one (in, sum of outs) MatMul operand."""
        return np.concatenate([m.weight.detach().float().numpy().T for m in modules], axis=1)

    def node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> list[str]:
        nodes.append(helper.make_node(op, inputs, outputs, name=f"/{outputs[0]}", domain=domain, **attrs))
        return outputs

    # The hidden states in (B, S, D): the table's rows where input_ids holds a token id (a decode step:
    # token ids in, inputs_embeds one row of zeros (1, 1, D)), inputs_embeds where it holds -1 (a prefill:
    # the embed module's rows, input_ids [[-1]]); the two broadcast against each other.
    table = weight("embed_tokens.weight", llm.embed_tokens.weight.detach().numpy())
    node("GreaterOrEqual", ["input_ids", const("zero_i64", 0, np.int64)], ["is_token"])
    node("Max", ["input_ids", "zero_i64"], ["token_row"])
    node("Gather", [table, "token_row"], ["token_embeds"], axis=0)
    node("Unsqueeze", ["is_token", const("axis_last", [-1], np.int64)], ["is_token_3d"])
    x = node("Where", ["is_token_3d", "token_embeds", "inputs_embeds"], ["hidden_in"])[0]

    # P+S (the positions in use after this step), seqlens_k, and the additive bias (B, 1, S, P+S)
    node("Shape", ["attention_mask"], ["total_1d"], start=1, end=2)
    node("Cast", ["total_1d"], ["total_1d_i32"], to=TensorProto.INT32)
    node("Squeeze", ["total_1d_i32"], ["total_sequence_length"])
    node("Shape", [x], ["batch_1d"], start=0, end=1)
    node("Greater", ["attention_mask", "zero_i64"], ["in_use"])
    if weighted_values:
        # seqlens_k from the mask's contents (the last position in use, over every row), computed on the
        # device: so a mask wider than the positions in use (static buffers) gives the same steps
        node("Cast", ["in_use"], ["in_use_i32"], to=TensorProto.INT32)
        node("Cast", [node("GreaterOrEqual", ["attention_mask", "zero_i64"], ["any_slot"])[0]], ["ones_i32"], to=TensorProto.INT32)
        node("CumSum", ["ones_i32", const("axis_1_i64", 1, np.int64)], ["slot_number"])
        node("Mul", ["slot_number", "in_use_i32"], ["used_number"])
        node("ReduceMax", ["used_number"], ["used_length"], keepdims=0)
        node("Sub", ["used_length", const("one_i32", 1, np.int32)], ["last_index"])
        node("Expand", ["last_index", "batch_1d"], ["seqlens_k"])
        # each new position's weight: exp(its bias) (GSWA's weight on image rows, 1 elsewhere), 0 where masked;
        # the new positions are the S before used_length, gathered (the mask may be wider than that)
        node("GreaterOrEqual", ["position_ids", "zero_i64"], ["any_position"])
        node("Cast", ["any_position"], ["new_ones"], to=TensorProto.INT32)
        node("CumSum", ["new_ones", "axis_1_i64"], ["new_from_end"], reverse=1)  # S .. 1
        node("Cast", [node("Sub", ["used_length", "new_from_end"], ["new_slot_i32"])[0]], ["new_slot"], to=TensorProto.INT64)
        node("GatherElements", ["attention_bias", "new_slot"], ["new_bias"], axis=1)
        node("GatherElements", ["attention_mask", "new_slot"], ["new_mask"], axis=1)
        node("Greater", ["new_mask", "zero_i64"], ["new_in_use"])
        node("Where", ["new_in_use", node("Exp", ["new_bias"], ["new_weight_exp"])[0], const("zero_f", 0.0, np.float32)],
             ["new_weight"])
        node("Unsqueeze", ["new_weight", "axis_last"], ["value_weight"])
    else:
        node("Sub", ["total_sequence_length", const("one_i32", 1, np.int32)], ["last_index"])
        node("Expand", ["last_index", "batch_1d"], ["seqlens_k"])
        node("Where", ["in_use", "attention_bias", const("masked_logit", MASKED_LOGIT, np.float32)], ["key_bias"])
        node("Unsqueeze", ["key_bias", const("axes_1_2", [1, 2], np.int64)], ["key_bias_4d"])
        node("Shape", [x], ["seq_1d"], start=1, end=2)
        node("Concat", ["batch_1d", const("one_i64_1d", [1], np.int64), "seq_1d", "total_1d"], ["bias_shape"], axis=0)
        # (B, 1, S, P+S): GroupQueryAttention takes no bias broadcast over the queries ("dimension 2 must be
        # equal to the sequence length")
        node("Expand", ["key_bias_4d", "bias_shape"], ["attention_bias_4d"])

    hp = padded_head_dim(hd) if weighted_values else hd  # the width of a head in the cache
    cos, sin = rope_caches(hd, cfg.rope_theta, cfg.max_position_embeddings)
    if weighted_values:  # the padded columns turn by 0 (zeros stay zeros)
        cos, sin = (np.pad(c, ((0, 0), (0, (hp - hd) // 2)), constant_values=fill) for c, fill in ((cos, 1.0), (sin, 0.0)))
    weight("cos_cache", cos)
    weight("sin_cache", sin)
    if weighted_values:  # the value rows' weight column, and the heads' shapes around the division by it
        ones = np.zeros((nkv, hp), np.float32)
        ones[:, hd] = 1.0
        const("weight_column", ones.reshape(-1), np.float32)
        const("heads_padded", [0, 0, nh, hp], np.int64)
        const("heads_joined", [0, 0, nh * hp], np.int64)
        const("den_start", [hd], np.int64)
        const("den_end", [hd + 1], np.int64)
        const("axis_3", [3], np.int64)
        # a query whose every key is masked (left padding) divides 0 by this, not by 0: 2^-24 is float16's
        # smallest number, so an FP16 engine keeps it
        const("smallest_den", 2.0 ** -24, np.float32)

    def heads(w_t: np.ndarray, n: int, pad) -> np.ndarray:
        """(in, n * hd) -> (in, n * hp): each of the n heads' columns laid out by `pad`."""
        return pad(w_t.reshape(w_t.shape[0], n, hd)).reshape(w_t.shape[0], n * hp)
    eps = float(cfg.rms_norm_eps)
    past, new = kv_names(L, PAST), kv_names(L, NEW)

    def attention(i: int, p: str, attn, qkv: str) -> tuple[str, np.ndarray]:
        """Layer i's attention on its q/k/v MatMul's output `qkv` -> (its output, the operand of the
        o_proj MatMul that reads it). Three subgraphs:

            rotary inside:  qkv ─> GroupQueryAttention(do_rotary, position_ids, bias) ─> out
            heads not a multiple of 16:
                            qkv ─> Split ─> q, k ─> RotaryEmbedding ─┐
                                        └─> v ───────────────────────┴─> GroupQueryAttention(bias) ─> out
            weighted values:
                            as above, v ─> Add(weight column) ─> Mul(value weight) ─> GroupQueryAttention
                            ─> Reshape ─> Div(by its weight column, Max'ed) ─> Reshape ─> out
        """
        attn_in = [past[2 * i], past[2 * i + 1], "seqlens_k", "total_sequence_length"]
        outputs = [f"{p}.attn", new[2 * i], new[2 * i + 1]]
        if rotary_inside:  # q, k and v packed, turned by GroupQueryAttention itself at position_ids
            o = node("GroupQueryAttention", [qkv, "", "", *attn_in, "cos_cache", "sin_cache", "position_ids", "attention_bias_4d"],
                     outputs, domain=MS, num_heads=nh, kv_num_heads=nkv, do_rotary=1, rotary_interleaved=0)[0]
            return o, linear_t(attn.o_proj)
        split = const(f"{p}.qkv_split", [nh * hp, nkv * hp, nkv * hp], np.int64)
        q, k, v = node("Split", [qkv, split], [f"{p}.q", f"{p}.k", f"{p}.v"], axis=-1)
        q = node("RotaryEmbedding", [q, "position_ids", "cos_cache", "sin_cache"], [f"{p}.q_rot"], domain=MS,
                 interleaved=0, num_heads=nh)[0]
        k = node("RotaryEmbedding", [k, "position_ids", "cos_cache", "sin_cache"], [f"{p}.k_rot"], domain=MS,
                 interleaved=0, num_heads=nkv)[0]
        if not weighted_values:
            o = node("GroupQueryAttention", [q, k, v, *attn_in, "", "", "", "attention_bias_4d"], outputs, domain=MS,
                     num_heads=nh, kv_num_heads=nkv)[0]
            return o, linear_t(attn.o_proj)
        # each value row as (w v, w, 0...): the attention's last columns then hold sum(p w v) and sum(p w),
        # and their quotient is what softmax(s + log w) gives
        v = node("Mul", [node("Add", [v, "weight_column"], [f"{p}.v_one"])[0], "value_weight"], [f"{p}.v_weighted"])[0]
        o = node("GroupQueryAttention", [q, k, v, *attn_in], [f"{p}.attn_weighted", *outputs[1:]], domain=MS,
                 num_heads=nh, kv_num_heads=nkv, scale=float(hd) ** -0.5)[0]
        o = node("Reshape", [o, "heads_padded"], [f"{p}.attn_heads"])[0]
        den = node("Slice", [o, "den_start", "den_end", "axis_3"], [f"{p}.attn_den"])[0]
        den = node("Max", [den, "smallest_den"], [f"{p}.attn_den_safe"])[0]
        o = node("Div", [o, den], [f"{p}.attn_normed"])[0]
        o = node("Reshape", [o, "heads_joined"], [f"{p}.attn"])[0]
        return o, heads(linear_t(attn.o_proj).T, nh, pad_value_head).T  # zero rows for the padded columns

    residual = None
    for i, layer in enumerate(llm.layers):
        p = f"layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        w_in = weight(f"{p}.input_layernorm.weight", layer.input_layernorm.weight.detach().numpy())
        if residual is None:
            h = node("SimplifiedLayerNormalization", [x, w_in], [f"{p}.attn_in"], axis=-1, epsilon=eps)[0]
            residual = x
        else:
            h, _, _, residual = node("SkipSimplifiedLayerNormalization", [x, residual, w_in],
                                     [f"{p}.attn_in", "", "", f"{p}.residual_a"], domain=MS, epsilon=eps)
        w_qkv = linear_t(attn.q_proj, attn.k_proj, attn.v_proj)
        if weighted_values:
            q_t, k_t, v_t = np.split(w_qkv, [nh * hd, (nh + nkv) * hd], axis=1)
            w_qkv = np.concatenate([heads(q_t, nh, pad_rotary_head), heads(k_t, nkv, pad_rotary_head),
                                    heads(v_t, nkv, pad_value_head)], axis=1)
        qkv = node("MatMul", [h, weight(f"{p}.qkv_proj.weight", w_qkv)], [f"{p}.qkv"])[0]
        o, w_o = attention(i, p, attn, qkv)
        o = node("MatMul", [o, weight(f"{p}.o_proj.weight", w_o)], [f"{p}.attn_out"])[0]
        w_post = weight(f"{p}.post_attention_layernorm.weight", layer.post_attention_layernorm.weight.detach().numpy())
        h, _, _, residual = node("SkipSimplifiedLayerNormalization", [o, residual, w_post],
                                 [f"{p}.mlp_in", "", "", f"{p}.residual_m"], domain=MS, epsilon=eps)
        gu = node("MatMul", [h, weight(f"{p}.gate_up_proj.weight", linear_t(mlp.gate_proj, mlp.up_proj))], [f"{p}.gate_up"])[0]
        inter = cfg.intermediate_size
        g, u = node("Split", [gu, const(f"{p}.gate_up_split", [inter, inter], np.int64)], [f"{p}.gate", f"{p}.up"], axis=-1)
        s = node("Sigmoid", [g], [f"{p}.gate_sigmoid"])[0]
        g = node("Mul", [g, s], [f"{p}.gate_silu"])[0]
        a = node("Mul", [g, u], [f"{p}.mlp_act"])[0]
        x = node("MatMul", [a, weight(f"{p}.down_proj.weight", linear_t(mlp.down_proj))], [f"{p}.mlp_out"])[0]

    # the last position only: (B, 1, D) of the MLP's output and of the residual, then the final norm and head
    for name, value in (("last_start", -1), ("last_end", np.iinfo(np.int64).max), ("seq_axis", 1)):
        const(name, [value], np.int64)
    x = node("Slice", [x, "last_start", "last_end", "seq_axis"], ["last_mlp_out"])[0]
    residual = node("Slice", [residual, "last_start", "last_end", "seq_axis"], ["last_residual"])[0]
    h = node("SkipSimplifiedLayerNormalization", [x, residual, weight("norm.weight", llm.norm.weight.detach().numpy())],
             ["final_norm"], domain=MS, epsilon=eps)[0]
    node("MatMul", [h, weight("lm_head.weight", linear_t(llm.lm_head))], [LOGITS])

    f32 = TensorProto.FLOAT
    kv_in = [helper.make_tensor_value_info(n, f32, ["batch", nkv, "capacity", hp]) for n in past]
    kv_out = [helper.make_tensor_value_info(n, f32, ["batch", nkv, "capacity", hp]) for n in new]
    graph = helper.make_graph(
        nodes, "decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["ids_batch", "ids_sequence"]),
         helper.make_tensor_value_info("inputs_embeds", f32, ["embeds_batch", "embeds_sequence", D]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
         helper.make_tensor_value_info("attention_bias", f32, ["batch", "total_sequence"]),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]), *kv_in],
        [helper.make_tensor_value_info(LOGITS, f32, ["batch", 1, cfg.vocab_size]), *kv_out],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                              ir_version=IR_VERSION, producer_name="sleigh")
    return model


def write(llm: LLM, out_dir: Path, opset: int, weighted_values: bool = False) -> list[str]:
    """`decoder.onnx` (+ `decoder.onnx.data` when its weights are over EXTERNAL_DATA_BYTES) in `out_dir`
    -> the files written."""
    import onnx

    path = Path(out_dir) / "decoder.onnx"
    if sum(p.numel() * 4 for p in llm.parameters()) <= EXTERNAL_DATA_BYTES:
        onnx.save_model(build(llm, opset, weighted_values=weighted_values), str(path))
        return [path.name]
    data_name = f"{path.name}.data"
    with open(path.parent / data_name, "wb") as data:
        model = build(llm, opset, data, data_name, weighted_values)
    onnx.save_model(model, str(path))
    return [path.name, data_name]
