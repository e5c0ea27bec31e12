"""The effects of a run: building it from a config, the loop, checkpoints, the workdir."""
