"""Training and evaluation data: rows read and validated (rows.py), the templates that turn
them into prompts and responses (templates.py), batches with their masks and positions
(batches.py), and the built-in demo data (demo.py)."""

from .batches import Prepared, collate, pack, pad_id, tokenize
from .rows import IGNORE, Example, load_rows, to_example
from .templates import GIST_TOKEN, TEMPLATES, format_example

__all__ = ["Example", "GIST_TOKEN", "IGNORE", "Prepared", "TEMPLATES", "collate", "format_example", "load_rows",
           "pack", "pad_id", "to_example", "tokenize"]
