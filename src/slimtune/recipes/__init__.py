"""The jobs the commands run, built from the layers below: training (train.py), evaluation
(evaluate.py), generation (generate.py), exports (export.py) and the core's check on a real
model (check.py)."""
