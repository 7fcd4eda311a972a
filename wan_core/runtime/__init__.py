"""Things applied to a built model from outside: compact weights (fp8, GGUF), fp8 matmul linears,
and what runs only while sampling (TF32, regional compile). Importing this package imports none of
its modules.

Order of the per-block weight transforms (forward hooks on each transformer block that swap
`param.data` for the duration of the block's forward, and put it back afterwards):

1. placement (`placement.py`, `blocks`): moves the stored bytes to the device (pre-hook prepended,
   post-hook last);
2. storage (`compact.py`): decodes fp8 / GGUF / bf16 storage into the compute dtype;
3. weight patches (LoRA deltas) add to the decoded weight.

Post-hooks restore in the reverse order: a transform installed after the storage hooks registers
its post-hook with `prepend=True` (`compact.add_weight_transform` does both halves right).
"""
