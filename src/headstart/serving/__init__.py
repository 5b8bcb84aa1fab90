"""Serving a trained model: export (TorchScript, ONNX) and the HTTP service."""
