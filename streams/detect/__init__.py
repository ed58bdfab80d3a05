"""Pure detection math over runs, no I/O: assembly, loops, windows, drift, failures, canaries, rollouts, budgets."""
