"""The network: the class-conditional UNet, its fast kernels, and its checkpoints on disk."""
