"""Engines from an exported package, torch-free: conversions (FP16, INT8 Q/DQ, INT4 weights), calibration, TensorRT builds, the accuracy gate and `sleigh inspect`."""


def versions() -> dict:
    """What an engine or a calibration was made with, as its manifest entry records it."""
    import onnx
    import onnxruntime

    from sleigh import __version__

    return {"sleigh": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
