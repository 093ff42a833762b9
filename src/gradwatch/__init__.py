"""gradwatch: watch per-layer gradients of a Lightning + Hydra training run in TensorBoard."""
