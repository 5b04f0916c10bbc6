"""Altogether re-alignment captioners."""
