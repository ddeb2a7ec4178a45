"""ONNX files as Sleigh writes and reads them, for export and for engine builds (onnx is imported
where it is used; nothing here imports torch)."""

from __future__ import annotations

from pathlib import Path

ORT_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators: not custom ops (ONNX Runtime has their kernels)
# Modules with more weights than this keep them in <name>.onnx.data. Over 2 GB protobuf cannot hold
# them; and ONNX Runtime maps external data rather than reading it, so weights a module never reads
# (an embedding table's rows that no prompt asks for) never become resident: the full-size INT8
# embedding opens at 10 MiB resident against 183 MiB inline (benchmarks/RESULTS.md, issue 14).
EXTERNAL_DATA_BYTES = 64 << 20


def versions(*also: str) -> dict:
    """What an ONNX artifact (a package, an engine, a calibration) was made with, as its manifest
    records it: sleigh, onnx, onnxruntime and python, and the modules named in `also` (export: torch)."""
    import importlib
    import platform

    import onnx
    import onnxruntime

    from sleigh import __version__

    made = {"sleigh": __version__, **{m: importlib.import_module(m).__version__ for m in also},
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    return {**made, "python": platform.python_version()}


def save_onnx(model, dst: Path) -> list[str]:
    """Save an onnx ModelProto; its weights go to `<name>.onnx.data` beside it when they are over
    EXTERNAL_DATA_BYTES (protobuf cannot hold 2 GB). Returns the file names written."""
    import onnx

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    data = f"{dst.name}.data"
    (dst.parent / data).unlink(missing_ok=True)  # onnx appends to external data, never replaces it
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if weights > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                        size_threshold=1024)
        return [dst.name, data]
    onnx.save_model(model, str(dst))
    return [dst.name]


def describe_io(path: Path) -> dict:
    """Inputs and outputs of an ONNX file with dtype and symbolic shape (reads the graph only)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def one(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]}

    custom = [{"domain": n.domain, "op_type": n.op_type,
               "attributes": {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute},
               "function": any(f.domain == n.domain and f.name == n.op_type for f in model.functions)}
              for n in model.graph.node if n.domain not in ("", "ai.onnx", ORT_DOMAIN)]
    contrib: dict[str, int] = {}  # ONNX Runtime's own operators (the fused decoder's, MatMulNBits): counted by type
    for n in model.graph.node:
        if n.domain == ORT_DOMAIN:
            contrib[n.op_type] = contrib.get(n.op_type, 0) + 1
    for c in custom:
        c["attributes"] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in c["attributes"].items()}
    return {"inputs": [one(v) for v in model.graph.input], "outputs": [one(v) for v in model.graph.output],
            "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import}, "custom_ops": custom,
            "onnxruntime_ops": contrib, "nodes": len(model.graph.node)}
