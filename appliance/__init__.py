"""appliance: an offline inference appliance serving INT8 ONNX models over a hosted-style API."""

__version__ = "0.1.0"
