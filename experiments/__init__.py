"""The paper's experiments, one script each (gate_norm.py, adaptive_aux.py, upcycling.py), sharing
common.py. A package only so that tests and notebooks can `import experiments.gate_norm`."""
