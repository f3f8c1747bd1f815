"""Training: the one loop, the Stage-1 step, the Stage-2 AB channels and their schedule."""
