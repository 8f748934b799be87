"""Kept only while compress/planner.py imports the parsers from here (it moves to flows/); shrink/units.py holds them."""

from shrink.units import parse_duration, parse_size

__all__ = ["parse_duration", "parse_size"]
