"""Single runs (layer L4, runs): the run driver (``driver``) trains one run, or a stack of runs, of any task;
the tasks (``forecast``, ``options``, registered in ``registry``) give it their data, samples, model and
evaluation (``task`` is the protocol); ``backtest`` is the walk-forward backtest run. ``record``,
``checkpoints`` and ``setup`` hold what every run shares: its MLflow record, checkpoint files and machine;
``stopping`` makes SIGTERM and SIGHUP end runs as Ctrl-C does."""
