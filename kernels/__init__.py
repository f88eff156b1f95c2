"""Fused Pallas kernels for Multi-Token Attention (GPU on Triton, TPU on Mosaic) and their XLA glue."""
