"""Calibration: data readers (target-agnostic) and calibration-method settings."""
