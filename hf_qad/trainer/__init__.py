"""QADTrainer and QADConfig: TRL's SFTTrainer turned into quantization-aware distillation."""

from hf_qad.trainer.qad_config import QADConfig
from hf_qad.trainer.qad_trainer import QADTrainer

__all__ = ["QADConfig", "QADTrainer"]
