"""Sparsity: pruning masks over a model's prunable weights and the kept-coordinate space."""
