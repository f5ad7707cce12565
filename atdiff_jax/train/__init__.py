"""Training: train state, EMA, sharding, the jitted step, the loop, checkpointing."""
