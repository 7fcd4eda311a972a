"""Things applied to built models from outside: memory planning (and, as they land, placement,
compact weights, LoRA patches, step cache, compile and distributed runs)."""
