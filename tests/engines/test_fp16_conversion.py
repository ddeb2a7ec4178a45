"""FP16 conversion (`build_engine.to_fp16`) on a graph where one FP32-kept weight feeds two blocked
ops: onnxruntime <= 1.31's converter inserts one Cast per consumer under a single output name, which
onnx_ir refused ("redeclared in the current graph scope") before `_without_repeated_nodes`."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sleigh.engines.build_engine import _sorted, _without_repeated_nodes, to_fp16

D = 8


def shared_weight_model(d: int = D) -> onnx.ModelProto:
    """x -> LayerNorm(w, b) -> MatMul(m) -> Mul(w) -> LayerNorm(w, b) -> y: w feeds an FP16 op and two
    LayerNorms (kept FP32), as the vision blocks' norm weights feed their LayerNorm and the GSWA node."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((1 + 0.1 * rng.standard_normal(d)).astype(np.float32), "w"),
             numpy_helper.from_array((0.1 * rng.standard_normal(d)).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32), "m")]
    nodes = [helper.make_node("LayerNormalization", ["x", "w", "b"], ["n1"], axis=-1, name="ln1"),
             helper.make_node("MatMul", ["n1", "m"], ["h"], name="mm"),
             helper.make_node("Mul", ["h", "w"], ["hw"], name="mul"),
             helper.make_node("LayerNormalization", ["hw", "w", "b"], ["y"], axis=-1, name="ln2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def run(model_or_path, x):
    data = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_repeated_casts_are_merged_and_the_graph_still_runs():
    model = shared_weight_model()
    # what the old converter wrote: the same Cast twice, one per LayerNorm
    casts = [helper.make_node("Cast", ["m"], ["m_cast"], to=TensorProto.FLOAT, name="m_cast_node") for _ in range(2)]
    model.graph.node[1].input[1] = "m_cast"
    model.graph.node.extend(casts)  # appended at the end, as the converter does: needs the sort too
    with pytest.raises(Exception) as refused:
        _sorted_raw(model)
    assert "redeclared" in chain_text(refused.value)
    fixed = _sorted(model)
    assert [n.op_type for n in fixed.graph.node].count("Cast") == 1
    onnx.checker.check_model(fixed, full_check=True)
    x = np.random.default_rng(1).standard_normal((3, D)).astype(np.float32)
    np.testing.assert_allclose(run(fixed, x), run(shared_weight_model(), x), rtol=1e-6, atol=1e-6)


def test_nodes_that_differ_are_all_kept():
    model = shared_weight_model()
    model.graph.node.extend([helper.make_node("Cast", ["m"], ["c"], to=TensorProto.FLOAT16),
                             helper.make_node("Cast", ["m"], ["c"], to=TensorProto.FLOAT)])
    assert len(_without_repeated_nodes(model).graph.node) == 6


def test_to_fp16_of_a_shared_weight_runs_and_stays_close(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(shared_weight_model(), str(src))
    to_fp16(src, tmp_path / "m16.onnx")
    converted = onnx.load(str(tmp_path / "m16.onnx"))
    dtypes = {t.name: t.data_type for t in converted.graph.initializer}
    assert dtypes["w"] == dtypes["m"] == TensorProto.FLOAT16
    outputs = [o for n in converted.graph.node for o in n.output]
    assert len(outputs) == len(set(outputs))  # every name defined once
    x = np.random.default_rng(2).standard_normal((4, D)).astype(np.float32)
    got, ref = run(tmp_path / "m16.onnx", x), run(src, x)
    assert got.dtype == np.float32  # FP32 at the edges
    np.testing.assert_allclose(got, ref, atol=2e-2, rtol=2e-2)


def test_shape_inference_takes_the_graph_without_its_external_weights(tmp_path, monkeypatch):
    """ONNX's shape inference serializes the model it is given, and protobuf serializes 2 GB at most: a
    full-size decoder (7.6 GB of weights in decoder.onnx.data) failed its FP16 conversion on an H200
    with "EncodeError: Failed to serialize proto". Here inference refuses, as protobuf would, any model
    that carries the weights; the conversion still runs and gives the FP32 module's outputs."""
    import onnxruntime.transformers.float16 as float16

    src = tmp_path / "m.onnx"
    onnx.save(shared_weight_model(256), str(src), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    weights = (tmp_path / "m.onnx.data").stat().st_size
    seen = []

    def like_protobuf(infer):
        def infer_shapes(model, *args, **kwargs):
            seen.append(model.ByteSize())
            if model.ByteSize() >= weights:
                raise RuntimeError("Failed to serialize proto (a stand-in for protobuf's 2 GB limit)")
            return infer(model, *args, **kwargs)
        return infer_shapes

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", like_protobuf(onnx.shape_inference.infer_shapes))
    monkeypatch.setattr(float16, "infer_shapes", like_protobuf(float16.infer_shapes))
    to_fp16(src, tmp_path / "m16.onnx")
    assert seen and max(seen) < weights  # inference ran, on the graph alone
    x = np.random.default_rng(3).standard_normal((4, 256)).astype(np.float32)
    np.testing.assert_allclose(run(tmp_path / "m16.onnx", x), run(src, x), atol=2e-2, rtol=2e-2)


def _sorted_raw(model):
    """onnx_ir's deserialize and sort alone, as `_sorted` did before."""
    import onnx_ir as ir

    ir.serde.deserialize_model(model).graph.sort()


def chain_text(exc: BaseException | None) -> str:
    text = ""
    while exc is not None:
        text, exc = text + f" {exc}", exc.__cause__ or exc.__context__
    return text
