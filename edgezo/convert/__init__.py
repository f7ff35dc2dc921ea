"""Format bridges: Hugging Face <-> GGUF, PEFT <-> GGUF LoRA, merged GGUF. Never imports training code."""
