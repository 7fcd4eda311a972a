"""What is applied to built models from outside: parallel runs on torch.distributed (process
groups and the plan in `distributed`, CFG-parallel, Ulysses sequence parallelism, FSDP2 sharded
weights) and the timed collectives they share (`comm`)."""
