"""What is applied to built models from outside, for the duration of a run (ARCHITECTURE.md section 7).

- `lora`: LoRA patches, applied per module forward and removed after the run.
- `planner` (with `estimates`, `meta_memory`, `sampling_plan`, `stage_plans`, `loading`): the
  memory planner, which estimates every stage before anything large is allocated, picks the
  placement and the VAE tiling that fit, and refuses with the figures what cannot.

Importing this package imports none of its modules.
"""
