"""The GSWA custom op: one `sleigh::GSWA` node in `gswa.onnx`, plus an ONNX local function of the
same name and domain whose body is standard ONNX, so ONNX Runtime and TensorRT's parser inline it.

Export emits an opaque node with `torch.onnx.ops.symbolic` (the exporter's inliner would erase a
function given to it), then `attach_function` adds the body to the exported model. Functions have
no initializers: every weight is a node input, in the order of `input_names`.
"""

from __future__ import annotations

import math

import onnx
import torch
from onnx import AttributeProto, TensorProto, helper

from sleigh.runtime.multimodal import GSWA_DOMAIN as DOMAIN
from sleigh.runtime.multimodal import GSWA_NODE_PREFIX
from sleigh.runtime.multimodal import GSWA_OP as OP_TYPE
from sleigh.runtime.multimodal import GSWA_OP_VERSION as OP_VERSION
from sleigh.runtime.multimodal import GSWA_PLUGIN_NAMESPACE as PLUGIN_NAMESPACE
from sleigh.sleighvl.gswa import BLOCK_PARAMS, GSWA


def input_names(num_blocks: int) -> list[str]:
    """Node inputs after `cls`: GSWA.state_dict() names in a fixed order."""
    names = ["alpha", "norm.weight", "norm.bias", "proj.weight", "proj.bias"]
    for i in range(num_blocks):
        names += [f"blocks.{i}.{n}" for n in BLOCK_PARAMS]
    return names + ["final_norm.weight", "final_norm.bias", "final_qk.weight", "final_qk.bias"]


def attributes(module: GSWA) -> dict:
    return {"heads": module.heads, "eps": float(module.cfg.layer_norm_eps), "num_blocks": len(module.blocks),
            "plugin_namespace": PLUGIN_NAMESPACE}


def gswa_call(module: GSWA, cls: torch.Tensor) -> torch.Tensor:
    """Eager: the reference math. During ONNX export: one opaque `sleigh::GSWA` node."""
    if not torch.onnx.is_in_onnx_export():
        return module(cls)
    params = dict(module.named_parameters())
    inputs = [cls] + [params[n] for n in input_names(len(module.blocks))]
    return torch.onnx.ops.symbolic(f"{DOMAIN}::{OP_TYPE}", inputs, attributes(module), dtype=cls.dtype,
                                   shape=(cls.shape[0],), version=OP_VERSION)


class _Body:
    """Collects nodes for the function body with unique value names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        self._n += 1
        outs = [f"{op_type.lower()}_{self._n}_{i}" for i in range(outputs)]
        node = helper.make_node(op_type, list(inputs), outs, name=f"{GSWA_NODE_PREFIX}{op_type}_{self._n}")
        for key, val in attrs.items():
            if isinstance(val, AttributeProto):  # a reference to the function's own attribute
                node.attribute.append(val)
            else:
                node.attribute.append(helper.make_attribute(key, val))
        self.nodes.append(node)
        return outs[0] if outputs == 1 else outs

    def const(self, name: str, value, dtype=TensorProto.FLOAT) -> str:
        arr = value if isinstance(value, list) else [value]
        dims = [] if not isinstance(value, list) else [len(value)]
        tensor = helper.make_tensor(name, dtype, dims, arr)
        self.nodes.append(helper.make_node("Constant", [], [name], value=tensor, name=f"{GSWA_NODE_PREFIX}{name}"))
        return name


def _eps_ref() -> AttributeProto:
    ref = AttributeProto()
    ref.name, ref.ref_attr_name, ref.type = "epsilon", "eps", AttributeProto.FLOAT
    return ref


def build_function(num_blocks: int, opset: int) -> onnx.FunctionProto:
    """The standard-ONNX body of sleigh::GSWA.

        cls ─LN─Gemm─► h ─[block: LN─QKV─MHSA─proj─+─LN─MLP(erf GELU)─+]×B─► LN─QK─softmax─► P [H,T,T]
        P[:, T-1, :] ─mean over heads─► a ─mask tiles, normalise to mean 1─► w ─1+α(w−1)─► thumbnail = 1
    """
    b = _Body()
    names = input_names(num_blocks)
    w = {n: n.replace(".", "_") for n in names}
    heads_attr = AttributeProto()
    heads_attr.name, heads_attr.ref_attr_name, heads_attr.type = "value_int", "heads", AttributeProto.INT
    heads = b.op("Constant", value_int=heads_attr)  # int64 scalar from the node's `heads`
    heads_1d = b.op("Unsqueeze", heads, b.const("axis0", [0], TensorProto.INT64))
    zero_i, minus1 = b.const("zero_1d", [0], TensorProto.INT64), b.const("minus1_1d", [-1], TensorProto.INT64)
    split_heads = b.op("Concat", zero_i, heads_1d, minus1, axis=0)  # [0, H, -1]
    merge_heads = b.op("Concat", zero_i, minus1, axis=0)  # [0, -1]
    one, half = b.const("one", 1.0), b.const("half", 0.5)
    sqrt2 = b.const("sqrt2", math.sqrt(2.0))

    def ln(x, prefix):
        return b.op("LayerNormalization", x, w[f"{prefix}.weight"], w[f"{prefix}.bias"], axis=-1, epsilon=_eps_ref())

    def linear(x, prefix):
        return b.op("Gemm", x, w[f"{prefix}.weight"], w[f"{prefix}.bias"], transB=1)

    def to_heads(x):  # (T, D) -> (H, T, hd)
        return b.op("Transpose", b.op("Reshape", x, split_heads), perm=[1, 0, 2])

    def probs(q, k):
        qh, kh = to_heads(q), to_heads(k)
        hd = b.op("Cast", b.op("Gather", b.op("Shape", qh), b.const(f"idx2_{b._n}", 2, TensorProto.INT64), axis=0), to=TensorProto.FLOAT)
        scores = b.op("Div", b.op("MatMul", qh, b.op("Transpose", kh, perm=[0, 2, 1])), b.op("Sqrt", hd))
        return b.op("Softmax", scores, axis=-1)  # (H, T, T)

    h = linear(ln("cls", "norm"), "proj")
    for i in range(num_blocks):
        p = f"blocks.{i}"
        q, k, v = b.op("Split", linear(ln(h, f"{p}.norm1"), f"{p}.attn.qkv"), axis=1, num_outputs=3, outputs=3)
        ctx = b.op("MatMul", probs(q, k), to_heads(v))  # (H, T, hd)
        ctx = b.op("Reshape", b.op("Transpose", ctx, perm=[1, 0, 2]), merge_heads)  # (T, D)
        h = b.op("Add", h, linear(ctx, f"{p}.attn.proj"))
        m = linear(ln(h, f"{p}.norm2"), f"{p}.mlp.fc1")
        gelu = b.op("Mul", b.op("Mul", m, half), b.op("Add", one, b.op("Erf", b.op("Div", m, sqrt2))))
        h = b.op("Add", h, linear(gelu, f"{p}.mlp.fc2"))
    q, k = b.op("Split", linear(ln(h, "final_norm"), "final_qk"), axis=1, num_outputs=2, outputs=2)
    last_row = b.op("Gather", probs(q, k), b.const("last", -1, TensorProto.INT64), axis=1)  # (H, T)
    a = b.op("ReduceMean", last_row, b.const("axes0", [0], TensorProto.INT64), keepdims=0)  # (T,)
    t = b.op("Gather", b.op("Shape", "cls"), b.const("idx0", 0, TensorProto.INT64), axis=0)
    n_tiles = b.op("Sub", t, b.const("one_i", 1, TensorProto.INT64))
    is_tile = b.op("Less", b.op("Range", b.const("zero_i", 0, TensorProto.INT64), t, b.const("step", 1, TensorProto.INT64)), n_tiles)
    zero = b.const("zero", 0.0)
    a_tiles = b.op("Where", is_tile, a, zero)
    total = b.op("ReduceSum", a_tiles, keepdims=0)
    total = b.op("Where", b.op("Greater", total, zero), total, one)
    weights = b.op("Div", b.op("Mul", b.op("Cast", n_tiles, to=TensorProto.FLOAT), a_tiles), total)
    gated = b.op("Add", one, b.op("Mul", w["alpha"], b.op("Sub", weights, one)))
    b.nodes.append(helper.make_node("Where", [is_tile, gated, one], ["weights"], name=f"{GSWA_NODE_PREFIX}output"))
    return helper.make_function(
        DOMAIN, OP_TYPE, inputs=["cls"] + [w[n] for n in names], outputs=["weights"], nodes=b.nodes,
        opset_imports=[helper.make_opsetid("", opset)], attributes=["heads", "eps", "num_blocks", "plugin_namespace"])


def attach_function(program, num_blocks: int, opset: int) -> None:
    """Add the GSWA body to an exported `torch.onnx.ONNXProgram` (onnx_ir model)."""
    import onnx_ir as ir

    fn = ir.serde.deserialize_function(build_function(num_blocks, opset))
    program.model.functions[fn.identifier()] = fn
    program.model.opset_imports[DOMAIN] = OP_VERSION

