"""Test-only ComfyUI nodes for the end-to-end tests of the workflow observer (never shipped).

- `WanBenchTestTinyUMT5Loader` (CLIP): ComfyUI's own Wan text encoder classes (`comfy.text_encoders.wan`)
  built with a small config read off a tiny UMT5 file (core's CLIPLoader always builds the full
  UMT5-XXL, whatever the file holds), so that core `CLIPTextEncode` runs for real on CPU.
- `WanBenchTestProbe` (output node): reports what a prompt left behind in the server process: live
  threads, open profiler observations, and the wrapper keys on a MODEL it is given.
"""

from __future__ import annotations

import sys
import threading

import comfy.sd
import comfy.supported_models_base
import comfy.text_encoders.wan
import comfy.utils
import folder_paths

D_KV = 64  # the tiny encoder files use one attention head of this width


def _config_of(sd: dict) -> dict:
    shared = sd["shared.weight"]
    blocks = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.block.")}
    q = sd["encoder.block.0.layer.0.SelfAttention.q.weight"]
    return {
        "d_model": int(shared.shape[1]),
        "vocab_size": int(shared.shape[0]),
        "num_layers": len(blocks),
        "d_ff": int(sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]),
        "d_kv": D_KV,
        "num_heads": int(q.shape[0]) // D_KV,
    }


class WanBenchTestTinyUMT5Loader:
    CATEGORY = "WanBench/test"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (folder_paths.get_filename_list("text_encoders"),)}}

    def load(self, clip_name):
        sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("text_encoders", clip_name))
        spiece = sd.pop("spiece_model")
        target = comfy.supported_models_base.ClipTarget(
            comfy.text_encoders.wan.WanT5Tokenizer, comfy.text_encoders.wan.te()
        )
        clip = comfy.sd.CLIP(
            target,
            tokenizer_data={"spiece_model": spiece},
            model_options={"umt5xxl_model_config": _config_of(sd)},
        )
        missing, unexpected = clip.load_sd(sd)
        if missing or unexpected:
            raise ValueError(f"tiny UMT5 file {clip_name}: missing {missing}, unexpected {unexpected}")
        return (clip,)


class WanBenchTestProbe:
    CATEGORY = "WanBench/test"
    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"label": ("STRING", {"default": "probe"})}, "optional": {"model": ("MODEL",)}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def probe(self, label, model=None):
        observers = [
            m
            for name, m in list(sys.modules.items())
            if name.endswith(".nodes.observer") and hasattr(m, "open_prompt_ids")
        ]
        open_ids = sorted({pid for m in observers for pid in m.open_prompt_ids()})
        wrapper_keys = sorted({key for table in (getattr(model, "wrappers", None) or {}).values() for key in table})
        callback_keys = sorted({key for table in (getattr(model, "callbacks", None) or {}).values() for key in table})
        info = {
            "label": [label],
            "threads": sorted(t.name for t in threading.enumerate()),
            "open_observations": open_ids,
            "observer_modules": [len(observers)],
            "wrapper_keys": wrapper_keys,
            "callback_keys": callback_keys,
        }
        return {"ui": info}


NODE_CLASS_MAPPINGS = {
    "WanBenchTestTinyUMT5Loader": WanBenchTestTinyUMT5Loader,
    "WanBenchTestProbe": WanBenchTestProbe,
}
