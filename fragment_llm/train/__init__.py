"""Training: a run's setup and loop, one optimisation step, the schedule, the runtime
(device, precision, DDP, lock, Ctrl-C), and what a resumed run continues with."""
