"""File formats and layouts (pure torch; no NeMo or megatron-core import): the adapter archive and its key format, the
merge delta, Megatron state dicts between TP/PP layouts and the fused-QKV interleave, the SFT JSONL checks, and the
Hugging Face mapping (``formats.hf``) both ways."""
