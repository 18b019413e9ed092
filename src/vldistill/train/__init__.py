"""Training: the one Fabric loop, optimiser and schedule, checkpoints, MLflow tracking."""
