"""Interfaces: the user-facing Python API, the command line and plots."""
