"""Training: `fit` (config -> run directory), the LightningModule and its optimizer, the time
budget's plan and the `Schedule` that owns the run's length, checkpoints and resume, the LR range
test, and the cross-validated audit. The only place Lightning's Trainer runs.

May import the contracts at the package root, `data` and `trust`.
"""
