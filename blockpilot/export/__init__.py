"""ONNX export, TensorRT engine builds and bundles."""
