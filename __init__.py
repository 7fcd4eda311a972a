"""ComfyUI-WanBench: Wan2.2 video generation on its own PyTorch runtime, profiled stage by stage.

ComfyUI imports this folder by path; it only needs the node mappings. Importing it never
imports ComfyUI and never touches a GPU.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
