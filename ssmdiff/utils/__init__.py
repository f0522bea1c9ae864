"""Small helpers shared by the trainer, the sampler and the CLI (images, logging, torchrun, EMA)."""
