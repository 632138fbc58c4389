"""Evaluation: reconstruction metrics, prompt following on the shapes set, and FID,
KID, Inception Score and CLIP score of generated images."""
