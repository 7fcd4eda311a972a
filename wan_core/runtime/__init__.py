"""What is applied to built models from outside, for the duration of a run (ARCHITECTURE.md section 7).

- `lora`: LoRA patches, applied per module forward and removed after the run.

Importing this package imports none of its modules.
"""
