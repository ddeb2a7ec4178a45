"""Sleigh: put SleighVL (InternVL2-2B + GSWA) on an edge GPU."""

__version__ = "0.1.0"
