"""Architectures the launcher can train: the registry (one entry per architecture) and their FLOPs."""
