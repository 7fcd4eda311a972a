"""ComfyUI node classes of the pack. Importing this never imports ComfyUI."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
