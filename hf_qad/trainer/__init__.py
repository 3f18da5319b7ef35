"""QADTrainer and QADConfig: TRL's SFTTrainer turned into quantization-aware distillation."""

from typing import Any

__all__ = ["QADConfig", "QADTrainer"]


def __getattr__(name: str) -> Any:
    # Imported when asked for: they pull in TRL, which hf_qad.trainer.losses (used by hf_qad.evaluation,
    # and through it by every CLI command) does not need.
    if name == "QADConfig":
        from hf_qad.trainer.qad_config import QADConfig

        return QADConfig
    if name == "QADTrainer":
        from hf_qad.trainer.qad_trainer import QADTrainer

        return QADTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
