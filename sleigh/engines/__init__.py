"""Engines from an exported package, torch-free: conversions (FP16, INT8 Q/DQ, INT4 weights), calibration, TensorRT builds, the accuracy gate and `sleigh inspect`."""
