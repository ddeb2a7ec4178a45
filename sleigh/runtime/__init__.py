"""The light runtime: numpy, Pillow, tokenizers and a backend package only (never torch, transformers or onnx)."""
