"""cxr-triage: chest X-ray triage inference service."""

__version__ = "0.1.0"
