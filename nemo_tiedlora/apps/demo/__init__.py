"""Self-contained demo of Tied-LoRA on a tiny generated language and task.

Everything here is generated locally (no downloads): a tiny English-like pretraining corpus, a
sentencepiece tokenizer trained on it, and an in-context lookup task in NeMo's SFT JSONL format
(:mod:`nemo_tiedlora.apps.demo.data`).
"""
