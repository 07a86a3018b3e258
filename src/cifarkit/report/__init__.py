"""Pages people look at: the run report, the comparison of runs, the plots they draw (data in,
Figure out) and the model summary table. They read finished run directories through `RunDir`.

May import the contracts at the package root, `data`, `trust` and `train`.
"""
