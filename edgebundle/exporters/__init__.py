"""torch -> ONNX export, always followed by the onnx checker, shape inference and a parity check."""
