"""The trainer: SFT, LoRA and DPO fine-tuning as jobs on the bus; data files, loss masks,
and the artifacts (adapters, models) a worker serves."""
