"""The radiologists' worklist page: plain HTML/CSS/JS shipped in the package (``static/``),
served at ``/`` by the service itself, and the image routes it reads (previews, heatmaps)."""

from cxr_triage.web.routes import build_web_router, install_web

__all__ = ["build_web_router", "install_web"]
