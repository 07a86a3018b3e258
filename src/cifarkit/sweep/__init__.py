"""Sweeps: the best recipe in the minutes you have. The search space (`space`), the Optuna study and
where it lives, shared by workers on one or many machines (`study`), the budgeted trials, their
pruning and the final training of the best setting (`run`), and the sweep's report (`report`).

May import the contracts at the package root, `data`, `trust`, `train` and `report`; Optuna (the
`sweep` extra) is imported only where a sweep runs.
"""
