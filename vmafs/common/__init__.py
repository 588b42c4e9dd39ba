"""Neutral utilities both halves use: progress bars, signal handling, atomic output files.

Nothing here knows the VMA format or either half: these modules import
nothing of the project but :mod:`vmafs.errors` (tests/test_layering.py).
"""
