"""Run as a script (`python experiments/gate_norm.py`), Python puts experiments/ on sys.path, not the
repository: importing this module first puts the repository there too, so `from experiments import ...`
and the top-level modules (train, model, router) import the same way as under `python -m experiments.x`."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
