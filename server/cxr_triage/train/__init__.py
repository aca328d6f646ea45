"""The companion trainer (extra ``train``): build, export and check models with PyTorch.

Serving code never imports this package; the CLI imports it lazily inside the commands
that need it.
"""
