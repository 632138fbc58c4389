"""Evaluation metrics (image reconstruction quality, ...)."""
