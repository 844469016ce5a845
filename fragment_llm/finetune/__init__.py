"""Fine-tuning on conversations: data, adapters, the run."""
