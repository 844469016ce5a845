"""`fragment serve`: an OpenAI-compatible HTTP API and a chat page (docs/serve.md)."""
