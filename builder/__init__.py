"""The builder: a trained ONNX model in, signed per-SKU bundles out."""
