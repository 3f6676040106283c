"""A run's life: set-up from the config, evaluation, results, checkpoints, in-process driver."""
