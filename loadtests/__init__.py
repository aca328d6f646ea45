"""Locust suites (locustfile.py), the images they send (samples.py) and the SLO checker (slo.py)."""
