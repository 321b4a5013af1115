"""Pure functional building blocks: per-sample gradients, HVP/IHVP, Fisher, projection."""
