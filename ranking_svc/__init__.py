"""Ranking service: scores a user's candidates with the bundle's ranking DNN in ONNX Runtime."""
