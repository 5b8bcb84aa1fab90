"""Serving a trained model: export (TorchScript, ONNX), the HTTP service, and its guard (API key, bounded queue)."""
