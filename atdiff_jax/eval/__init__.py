"""Evaluation: sampling from trained models, sample grids."""
