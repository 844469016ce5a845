"""The safety net under every stage: safe file I/O, terminal-safe text, signals, and
helper processes that never outlive their parent."""
