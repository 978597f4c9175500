"""The training stage: the model, a plain-PyTorch loop, and its Ray Train wiring."""
