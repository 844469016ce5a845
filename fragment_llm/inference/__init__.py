"""Using a trained model: the generation engine, prompts and streamed text, and the chat."""
