"""The `slimtune` command line (main.py), its flags generated from typed configs (flags.py)."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
