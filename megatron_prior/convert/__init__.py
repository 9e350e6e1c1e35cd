"""Hugging Face models in and out: Llama-family causal LMs to and from this project's GPT
checkpoints (``llama``). Above ``models`` and ``checkpoint``; only the tools import it."""
