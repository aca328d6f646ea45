"""Radiologists' final labels: the documented export the trainer and clinical metrics read."""
