"""What is applied to built models from outside, for the duration of a run (ARCHITECTURE.md section 7).

- `lora`: LoRA patches, applied per module forward and removed after the run.
- parallel runs on torch.distributed: `distributed` (the plan, process groups, sampling under a
  plan), `cfg_parallel`, `ulysses` (sequence parallelism), `sharding` (FSDP2 sharded weights),
  `comm` (the timed collectives they share), `volume` (bytes per step, analytic).

Importing this package imports none of its modules.
"""
