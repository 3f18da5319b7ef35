"""Writing NVFP4 checkpoints that serving engines load."""
