"""Fine-tuning on conversations: the conversation data boundary, and the runs built on it."""
