"""edgezo: fine-tune LLM adapters with forward passes only (MeZO through llama.cpp). See README.md."""

__version__ = "0.1.0"
