"""Turn a local Hugging Face checkpoint into a validated INT8 ONNX model folder with a manifest.

Needs the `export` extra (torch, transformers, optimum). The server never imports this package.
"""
