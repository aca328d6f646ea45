"""Inference engines. Serving loads ONNX files; the PyTorch reference lives in train/."""

from cxr_triage.engines.base import Engine
from cxr_triage.engines.onnx import OnnxEngine, accelerated, choose_providers

__all__ = ["Engine", "OnnxEngine", "accelerated", "choose_providers"]
