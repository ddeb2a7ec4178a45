"""What ONNX Runtime's GroupQueryAttention takes on a provider: one GQA node (a decode step after 7
cached positions, shared buffers), float16 and float32, with and without attention_bias. One line per
case: it ran (and the largest output value), or the error's first line. scripts/gpu_check.sh runs it
on CUDA, where ONNX Runtime's source says the kernel is float16/bfloat16 only and refuses
attention_bias (runtime/backends/onnxruntime_backend.FUSED_NOT_ON_CUDA); there the session has the
CUDA provider alone and the CPU fallback off, so a case the CUDA kernel cannot take fails instead of
running on the CPU.

    python benchmarks/gqa_cuda_probe.py [--provider CUDAExecutionProvider] [--model DECODER.onnx ...]

`--model`: also open each of these models on the provider with CUDA graphs on, which ONNX Runtime
refuses when a node (other than shape computations) is not on CUDA (gpu_check.sh passes the fused-cuda
FP16 decoder, and the fused one for contrast).
"""

from __future__ import annotations

import argparse

import numpy as np

HEADS, KV_HEADS, HEAD_DIM, PAST, CAPACITY = 4, 2, 64, 7, 16


def model(dtype: int, bias: bool):
    from onnx import TensorProto, helper

    io = lambda name, t, shape: helper.make_tensor_value_info(name, t, shape)  # noqa: E731
    inputs = [io("q", dtype, [1, 1, HEADS * HEAD_DIM]), io("k", dtype, [1, 1, KV_HEADS * HEAD_DIM]),
              io("v", dtype, [1, 1, KV_HEADS * HEAD_DIM]), io("past_k", dtype, [1, KV_HEADS, CAPACITY, HEAD_DIM]),
              io("past_v", dtype, [1, KV_HEADS, CAPACITY, HEAD_DIM]), io("seqlens_k", TensorProto.INT32, [1]),
              io("total", TensorProto.INT32, [])]
    names = [i.name for i in inputs] + ["", "", ""]
    if bias:
        inputs.append(io("bias", dtype, [1, 1, 1, PAST + 1]))
        names.append("bias")
    node = helper.make_node("GroupQueryAttention", names, ["out", "present_k", "present_v"], domain="com.microsoft",
                            num_heads=HEADS, kv_num_heads=KV_HEADS)
    graph = helper.make_graph([node], "gqa", inputs, [io("out", dtype, None), io("present_k", dtype, None),
                                                      io("present_v", dtype, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def probe(provider: str, dtype_name: str, bias: bool) -> str:
    import onnxruntime as ort
    from onnx import TensorProto

    dtype = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT}[dtype_name]
    np_dtype = np.float16 if dtype_name == "float16" else np.float32
    opts = ort.SessionOptions()
    if provider != "CPUExecutionProvider":
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((1, 1, HEADS * HEAD_DIM)), "k": rng.standard_normal((1, 1, KV_HEADS * HEAD_DIM)),
             "v": rng.standard_normal((1, 1, KV_HEADS * HEAD_DIM)),
             "past_k": rng.standard_normal((1, KV_HEADS, CAPACITY, HEAD_DIM)),
             "past_v": rng.standard_normal((1, KV_HEADS, CAPACITY, HEAD_DIM))}
    feeds = {k: v.astype(np_dtype) for k, v in feeds.items()}
    feeds.update(seqlens_k=np.array([PAST], np.int32), total=np.array(PAST + 1, np.int32))
    if bias:
        feeds["bias"] = (0.1 * rng.standard_normal((1, 1, 1, PAST + 1))).astype(np_dtype)
    try:
        sess = ort.InferenceSession(model(dtype, bias).SerializeToString(), opts, providers=[provider])
        out = sess.run(["out"], feeds)[0]
        return f"ran on {sess.get_providers()[0]}, max |out| {float(np.abs(out).max()):.3f}"
    except Exception as e:  # onnxruntime's own exception types
        return "error: " + (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def opens_for_graphs(provider: str, path: str) -> str:
    """Whether ONNX Runtime opens the model at `path` with CUDA graphs on (it refuses when a node other
    than a shape computation is not on the CUDA provider); on another provider, whether it opens."""
    import onnxruntime as ort

    graphs = provider == "CUDAExecutionProvider"
    try:
        ort.InferenceSession(path, providers=[(provider, {"enable_cuda_graph": "1"}) if graphs else provider])
        return "opens with enable_cuda_graph" if graphs else "opens"
    except Exception as e:  # onnxruntime's own exception types
        return "error: " + (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", default="CPUExecutionProvider")
    ap.add_argument("--model", nargs="*", default=[])
    args = ap.parse_args()
    for dtype_name in ("float16", "float32"):
        for bias in (False, True):
            print(f"GroupQueryAttention {dtype_name}, {'with' if bias else 'no'} attention_bias on {args.provider}: "
                  f"{probe(args.provider, dtype_name, bias)}", flush=True)
    for path in args.model:
        print(f"{path} on {args.provider}: {opens_for_graphs(args.provider, path)}", flush=True)


if __name__ == "__main__":
    main()
