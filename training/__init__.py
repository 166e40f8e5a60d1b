"""Training side: the model, its ONNX export and the Triton model repositories."""
