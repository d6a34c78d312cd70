"""The diffusion around the network: noising objective and guided sampling (on diffusers'
schedulers), the training loop, and sampling to PNG files that carry their provenance."""
