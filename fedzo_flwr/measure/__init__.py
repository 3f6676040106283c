"""Measurement: FLOPs counts, process memory measurement and the analytic memory model."""
