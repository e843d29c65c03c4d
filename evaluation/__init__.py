"""Offline data (MIND readers, simulator, datasets) and evaluation (metrics, baselines, protocols)."""
