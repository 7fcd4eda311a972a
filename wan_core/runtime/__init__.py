"""Things applied to built models from outside (ARCHITECTURE.md section 7). Importing this package
imports none of its modules.

- `compact`: weights kept as stored (fp8 + scale, GGUF blocks, bf16), decoded per block forward;
- `fp8_matmul`: fp8 x fp8 linears over compact fp8 weights;
- `lora`: LoRA patches, applied per module forward and removed after the run;
- `execution`: what runs only while sampling (TF32, regional compile);
- parallel runs on torch.distributed: `distributed` (the plan, process groups, sampling under a
  plan), `cfg_parallel`, `ulysses` (sequence parallelism), `sharding` (FSDP2 sharded weights),
  `comm` (the timed collectives they share), `volume` (bytes per step, analytic).
- `planner` (with `estimates`, `meta_memory`, `sampling_plan`, `stage_plans`, `loading`): the
  memory planner, which estimates every stage before anything large is allocated, picks the
  placement and the VAE tiling that fit, and refuses with the figures what cannot.

Order of the per-block weight transforms (forward hooks on each transformer block that swap
`param.data` for the duration of the block's forward, and put it back afterwards):

1. placement (`placement.py`, `blocks`): moves the stored bytes to the device (pre-hook prepended,
   post-hook last);
2. storage (`compact.py`, registered at load): decodes fp8 / GGUF / bf16 storage into the compute dtype;
3. weight patches (`lora.py`) add to the decoded weight.

Post-hooks restore in the reverse order: a transform installed after the storage hooks registers
its post-hook with `prepend=True` (`lora.py` does; `compact.add_weight_transform` does both halves right).

A parallel run's sharded weights (`sharding.py`, FSDP2) come before all of these and refuse experts
that carry such hooks; its Ulysses layout only changes which token rows a process computes.
"""
