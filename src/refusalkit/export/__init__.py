"""Exporting a variant in the format it is served in (GGUF, safetensors), with a model card."""
