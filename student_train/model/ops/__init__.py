"""Functional KDA ops: a PyTorch implementation (any device) and fla's kernels (CUDA)."""
