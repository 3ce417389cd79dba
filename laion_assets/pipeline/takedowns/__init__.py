"""Takedowns: block lists and what they match; the removal itself is the core's (`removal.py`)."""
