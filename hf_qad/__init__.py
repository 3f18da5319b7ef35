"""hf_qad: quantization-aware distillation to NVFP4 for Hugging Face transformers and TRL."""

__version__ = "0.1.0.dev0"
