"""`fragment experiment` and `fragment report`: plans of training runs compared over
seeds, their results table, and the curves of any run folder (docs/experiment.md)."""
