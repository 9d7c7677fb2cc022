"""hf_condroute inside the tools around it: Trainer callbacks and losses, accelerate/DDP/FSDP/DeepSpeed launches,
warm starts from saved adapters, COMET's permutation local search. Imported by name
(`hf_condroute.integrations.distributed`); the public pieces are re-exported at the top level."""
