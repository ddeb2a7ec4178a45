"""The INT8 embedding table of a weight-only INT8/INT4 engine (build_engine.embed_int8)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from sleigh.engines.build_engine import embed_int8
from tests.runtime.package_copies import load


def test_int8_rows_stay_within_half_a_step_and_image_rows_are_untouched(tiny_pkg, tmp_path):
    manifest = load(tiny_pkg)
    embed_int8(tiny_pkg / "embed.onnx", tmp_path / "embed.onnx")
    model = onnx.load(str(tmp_path / "embed.onnx"))
    tables = [t for t in model.graph.initializer if len(t.dims) == 2 and t.dims[1] > 1]
    assert [t.data_type for t in tables] == [onnx.TensorProto.INT8]  # the only table left is int8 (+ a scale column)
    assert sum(n.op_type == "Gather" for n in model.graph.node) == 2  # the rows and their scales

    table = next(numpy_helper.to_array(t) for t in onnx.load(str(tiny_pkg / "embed.onnx")).graph.initializer if len(t.dims) == 2)
    V, D = table.shape
    img = manifest["prompt"]["img_context_token_id"]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (2, 40)).astype(np.int64)
    ids[0, 3:7] = img
    feeds = {"input_ids": ids, "image_embeds": rng.standard_normal((4, D)).astype(np.float32)}
    want = ort.InferenceSession(str(tiny_pkg / "embed.onnx")).run(None, feeds)[0]
    got = ort.InferenceSession(str(tmp_path / "embed.onnx")).run(None, feeds)[0]
    np.testing.assert_array_equal(got[0, 3:7], want[0, 3:7])  # image rows pass through
    step = np.abs(table).max(axis=1) / 127  # one int8 step of each row
    text = ids != img
    err = np.abs(got - want)[text]
    assert (err <= step[ids[text]][:, None] / 2 + 1e-7).all()
    assert err.max() > 0  # quantized, not copied
