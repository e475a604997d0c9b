"""Serving: many adapters over one base in one generation loop (engine.py), the adapters a
server knows and loads on demand (pool.py), and the OpenAI-compatible HTTP API (app.py)."""
