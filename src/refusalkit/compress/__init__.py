"""Compression of the run's base model into named variants (see :mod:`refusalkit.compress.job`).

Pruning: magnitude, Wanda, SparseGPT (unstructured and N:M). Quantization: LLM.int8 (bitsandbytes
or pure PyTorch), AWQ and round-to-nearest (group-wise, 2-8 bits). Calibration data: instruction
sources (chat-formatted or not), a bundled text corpus, or a user file. Each family module
registers its methods in :mod:`refusalkit.compress.methods` when imported here (listed in the
order of their ``rank``).
"""

from refusalkit.compress import awq, int8, pruning, quant, refusal_pruning, refusal_quant  # noqa: F401  (each registers its methods)
