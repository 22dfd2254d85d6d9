"""Inference: training (SVI), posterior summaries, evidence and LOO, ArviZ export, PPC, forecasts, scores."""
