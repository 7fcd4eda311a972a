"""Small standard-library helpers shared by every layer of the pack (no torch, no ComfyUI)."""
