"""ONNX Runtime backend: one session per module, named feeds, the KV cache fed back by name.

CPU provider by default; the CUDA provider when onnxruntime-gpu offers it (`providers` in order of
preference). The decoder runs through IOBinding on both: the `present` OrtValues of one step are
bound as the `past` of the next, so the cache stays on the device (GPU memory under CUDA) and is
never copied back to the host; only the logits are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sleigh.errors import SleighError, first_line
from sleigh.runtime.backends.base import Backend
from sleigh.runtime.package import module_path

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def session_options(threads: int | None = None, *, arena: bool = True):
    """Sleigh's ONNX Runtime session settings: quiet logs, `threads` intra-op threads when given,
    and no CPU memory arena where a caller opens large modules one after another (an arena keeps its peak)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = arena
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, files: dict[str, Path], num_layers: int, num_kv_heads: int, head_dim: int,
                 threads: int | None = None, providers: list[str] | None = None, label: str = "fp32"):
        import onnxruntime as ort

        self.ort = ort
        self.providers = providers or ([CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU])
        opts = session_options(threads)
        self.sessions = {}
        for module, path in files.items():
            try:
                self.sessions[module] = ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
            except Exception as e:  # onnxruntime raises its own exception types
                raise SleighError(str(path), f"ONNX Runtime cannot load it ({first_line(e)})",
                                  "an intact package module (check with `sleigh inspect --verify`)") from None
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.label = label
        self._past: dict = {}
        self._past_len = 0
        self._kv_dtype = self._input_dtype("decoder", "past_key_values.0.key")
        self.device = "cuda" if self.providers[0] == CUDA else "cpu"
        self._present_names = [o.name for o in self.sessions["decoder"].get_outputs() if o.name.startswith("present.")]

    @classmethod
    def from_package(cls, pkg: Path, manifest: dict, threads: int | None = None, providers: list[str] | None = None,
                     engine: dict | None = None) -> OnnxRuntimeBackend:
        cfg = manifest["model_config"]["llm"]
        if engine is None:
            files = {m: module_path(pkg, manifest, m) for m in ("vision", "embed", "decoder")}
            label = "package fp32"
        else:
            files = {m: Path(pkg) / f for m, f in engine["modules"].items()}
            label = engine.get("name") or engine["precision"]
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

    def _device_value(self, array: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def reset(self, batch=1):
        empty = np.zeros((batch, self.num_kv_heads, 0, self.head_dim), self._kv_dtype)
        self._past = {f"past_key_values.{i}.{kind}": self._device_value(empty)
                      for i in range(self.num_layers) for kind in ("key", "value")}
        self._past_len = 0

    def step(self, inputs_embeds, attention_mask, attention_bias, position_ids):
        sess = self.sessions["decoder"]
        binding = sess.io_binding()
        feeds = {"inputs_embeds": inputs_embeds.astype(np.float32, copy=False), "attention_mask": attention_mask,
                 "attention_bias": attention_bias.astype(np.float32, copy=False), "position_ids": position_ids}
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, self._device_value(array))
        for name, value in self._past.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")  # the sampler reads logits on the host
        for name in self._present_names:
            binding.bind_output(name, self.device)  # the cache stays where it is computed
        sess.run_with_iobinding(binding)
        outputs = dict(zip(["logits", *self._present_names], binding.get_outputs()))
        self._past = {f"past_key_values.{n[len('present.'):]}": outputs[n] for n in self._present_names}
        self._past_len = self._past["past_key_values.0.key"].shape()[2]
        return outputs["logits"].numpy()[:, -1].astype(np.float32)

    @property
    def past_length(self):
        return self._past_len

    def describe(self):
        return f"onnxruntime [{self.label}] ({self.providers[0].removesuffix('ExecutionProvider')})"
