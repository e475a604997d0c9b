"""Evaluation building blocks: generation (generation.py), scores of generated text
(metrics.py), a judge behind any OpenAI-compatible endpoint (judge.py), and the typed configs
of `slimtune eval` and `slimtune generate` (config.py). The commands themselves are recipes."""
