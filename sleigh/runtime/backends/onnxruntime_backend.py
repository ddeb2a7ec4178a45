"""ONNX Runtime backend: one session per module, named feeds, the KV cache fed back by name.

CPU provider by default; the CUDA provider when onnxruntime-gpu offers it (`providers` in order of
preference). The present tensors of one step become the past of the next without copies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sleigh.errors import SleighError
from sleigh.runtime.backends.base import Backend
from sleigh.runtime.package import module_path

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, files: dict[str, Path], num_layers: int, num_kv_heads: int, head_dim: int,
                 threads: int | None = None, providers: list[str] | None = None, label: str = "fp32"):
        import onnxruntime as ort

        self.ort = ort
        self.providers = providers or ([CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU])
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.sessions = {}
        for module, path in files.items():
            try:
                self.sessions[module] = ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
            except Exception as e:  # onnxruntime raises its own exception types
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise SleighError(str(path), f"ONNX Runtime cannot load it ({first[:300]})",
                                  "an intact package module (check with `sleigh inspect --verify`)") from None
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.label = label
        self._past: dict[str, np.ndarray] = {}
        self._past_len = 0
        self._kv_dtype = self._input_dtype("decoder", "past_key_values.0.key")

    @classmethod
    def from_package(cls, pkg: Path, manifest: dict, threads: int | None = None, providers: list[str] | None = None,
                     engine: dict | None = None) -> OnnxRuntimeBackend:
        cfg = manifest["model_config"]["llm"]
        if engine is None:
            files = {m: module_path(pkg, manifest, m) for m in ("vision", "embed", "decoder")}
            label = "fp32"
        else:
            files = {m: Path(pkg) / f for m, f in engine["modules"].items()}
            label = engine["precision"]
        return cls(files, cfg["num_layers"], cfg["num_kv_heads"], cfg["hidden_size"] // cfg["num_heads"],
                   threads=threads, providers=providers, label=label)

    def _input_dtype(self, module: str, name: str):
        for i in self.sessions[module].get_inputs():
            if i.name == name:
                return np.float16 if "float16" in i.type else np.float32
        return np.float32

    def run(self, module, feeds):
        sess = self.sessions[module]
        outs = sess.run(None, feeds)
        return {o.name: v for o, v in zip(sess.get_outputs(), outs)}

    def reset(self, batch=1):
        empty = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), self._kv_dtype)
        self._past = {f"past_key_values.{i}.{kind}": empty for i in range(self.num_layers) for kind in ("key", "value")}
        self._past_len = 0

    def step(self, inputs_embeds, attention_mask, attention_bias, position_ids):
        feeds = {"inputs_embeds": inputs_embeds.astype(np.float32, copy=False), "attention_mask": attention_mask,
                 "attention_bias": attention_bias.astype(np.float32, copy=False), "position_ids": position_ids, **self._past}
        out = self.run("decoder", feeds)
        self._past = {f"past_key_values.{k[len('present.'):]}": v for k, v in out.items() if k.startswith("present.")}
        self._past_len = next(iter(self._past.values())).shape[2]
        return out["logits"][:, -1].astype(np.float32)

    @property
    def past_length(self):
        return self._past_len

    def describe(self):
        return f"onnxruntime {self.label} ({self.providers[0].removesuffix('ExecutionProvider')})"
