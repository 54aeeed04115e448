"""Evaluation metrics (method.md section 6)."""
