"""MatMulNBits bits x accuracy level on one package: logits cosine vs FP32 and decode tokens/s.

    python benchmarks/weight_only_levels.py runs/small-pkg-g
"""
import shutil, onnx, logging
import numpy as np
from pathlib import Path
from onnxruntime.quantization import QuantFormat
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
from sleigh.runtime.pipeline import Pipeline
logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
import sys
src = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/small-pkg-g")
res = {}
for bits in (8, 4):
    for level in (None, 4):
        d = Path(f"/tmp/acc/{bits}-{level}"); shutil.rmtree(d, ignore_errors=True); shutil.copytree(src, d)
        cfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=bits, accuracy_level=level, quant_format=QuantFormat.QOperator)
        q = MatMulNBitsQuantizer(onnx.load(str(d / "decoder.onnx")), bits=bits, block_size=32, is_symmetric=True, accuracy_level=level, algo_config=cfg)
        q.process()
        (d / "decoder.onnx").unlink()
        onnx.save(q.model.model, str(d / "decoder.onnx"))
        res[(bits, level)] = d
ref = Pipeline.load(src, engine="package")
r0 = ref.prefill("examples/coffee.jpg")
for k, d in res.items():
    p = Pipeline.load(d, engine="package")
    r = p.prefill("examples/coffee.jpg")
    cos = float((r.logits*r0.logits).sum()/np.linalg.norm(r.logits)/np.linalg.norm(r0.logits))
    tps = [p.generate(None, "Tell me a story.", max_new_tokens=48, ignore_eos=True).result.timings.decode_tokens_per_s for _ in range(2)]
    print(k, f"logits cos {cos:.5f}", "decode tok/s", [round(t,1) for t in tps], flush=True)
tps = [ref.generate(None, "Tell me a story.", max_new_tokens=48, ignore_eos=True).result.timings.decode_tokens_per_s for _ in range(2)]
print("fp32", [round(t,1) for t in tps])
