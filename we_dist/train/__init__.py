"""Training: the worker loop every DDP rank runs, and the driver that starts it on Ray Train."""
