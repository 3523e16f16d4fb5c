"""The paper's experiments, one module each (gate_norm, adaptive_aux, balance_loss, upcycling; ep_demo for
notebook 05), sharing runner.py (the grid of training jobs, the full-scale plans) and analysis.py (metrics,
seed statistics and verdicts, tables, plots). Run them from the repository root as
`python -m experiments.gate_norm ...` (or `python experiments/gate_norm.py ...`)."""
