"""Probabilistic model: priors, amortized encoders, and the Pyro model/guide (no file I/O)."""
