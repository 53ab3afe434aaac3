"""The Hugging Face mapping in one place: Llama-family checkpoints (folders, .gguf) into NeMo state dicts
(``llama_to_nemo``, ``source``), adapters and bases back out as HF PEFT LoRA / HF Llama (``nemo_to_hf``), and the
tokenizer files every transformers release reads alike (``tokenizer``)."""
