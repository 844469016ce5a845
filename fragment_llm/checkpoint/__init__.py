"""Checkpoints: the step-folder layout, its typed records, saving, loading as hostile input,
the provenance link checks, and the one loader from a checkpoint to a ready model."""
