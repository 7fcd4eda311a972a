"""Wan2.2 in plain PyTorch: DiT, UMT5, VAEs, solvers and the sampling loop. Never imports ComfyUI."""
