"""The light runtime: numpy, Pillow, tokenizers and a backend package only (never torch, transformers or onnx)."""

DEFAULT_PROMPT = "Describe the image in detail."  # the question when none is given: Pipeline, `run`, `bench`, export's parity
DEFAULT_MAX_NEW_TOKENS = 512  # the longest answer when the caller sets no limit: Pipeline, `sleigh run`, the server, checkpoints
