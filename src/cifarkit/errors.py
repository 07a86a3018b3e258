"""The one exception type a user can cause; the CLI prints it as a single line."""


class CifarkitError(Exception):
    """Bad input or environment: the message says what happened and what to do."""


class RunInterrupted(Exception):
    """Training stopped on Ctrl-C; the run directory can be resumed from its last checkpoint."""

    def __init__(self, run_dir, how: str):
        super().__init__(how)
        self.run_dir, self.how = run_dir, how
