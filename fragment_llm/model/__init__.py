"""The GPT: ids in, logits out; no text, files, devices or printing.

components.py (the parts and their registries), gpt.py (KVCache, attention, Block, GPT),
loss.py (lm_loss, bits_per_byte), size.py (parameter counts, FLOPs, memory plans). Nothing
is imported here: the package itself loads no torch.
"""
