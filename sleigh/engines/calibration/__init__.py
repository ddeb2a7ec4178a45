"""Calibration data from images, symmetric Q/DQ INT8 quantization, TensorRT calibration caches.

    int8                        which tensors are quantized, the integer range, where the ranges live
    collect.calibrate_package   images -> activation ranges of vision.onnx, stored in the package
    qdq.quantize_vision_qdq     ranges -> a symmetric Q/DQ INT8 vision.onnx (ONNX Runtime, TensorRT)
    trt_cache                   TensorRT 10.x calibration cache files

Importing this package is cheap: onnx and onnxruntime are imported where they are used.
"""
