"""Paged attention kernels (plain PyTorch)."""
