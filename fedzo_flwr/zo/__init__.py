"""Zeroth-order (forward-only) training: directions, client estimator, server reconstruction."""
