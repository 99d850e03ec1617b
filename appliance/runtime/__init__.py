"""What every task shares: onnxruntime sessions, tokenisation and the micro-batcher."""
