"""Synthetic preference worlds with exact oracles: tabular (finite X, Y) and token worlds."""
