"""Checkpoint formats: generic reading and writing (`io`), then one module per model family.

- `io`: safetensors (single, sharded with an index, folders), tensors-only pickles
  (`torch.load(weights_only=True)`), ComfyUI's fp8 "scaled" layout and prefixes, atomic writing.
- `dit`: the DiT's official <-> diffusers key map, config detection, `load_dit`, `load_experts`,
  `save_dit`.
- `t5`: the UMT5 encoder's official <-> Hugging Face / ComfyUI key map, detection,
  `load_text_encoder`, `save_text_encoder`.
- `vae`: the VAE's official <-> diffusers key map, detection, `load_vae`, `save_vae`.
- `latent`: one sampled latent beside a report (`save_latent`, `load_latent`).

The model files (`wan_core/dit.py`, `t5.py`, `vae.py`) hold the modules only. Importing this
package imports none of its modules.
"""
