"""torch -> ONNX export per module, the GSWA op, parity verification."""
