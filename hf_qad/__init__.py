"""hf_qad: quantization-aware distillation to NVFP4 for Hugging Face transformers and TRL.

Importing hf_qad registers :class:`NVFP4Config` with transformers:

    >>> import hf_qad  # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained(path, quantization_config=hf_qad.NVFP4Config())  # doctest: +SKIP
"""

from hf_qad.export import attach_model_card, save_modelopt_checkpoint, write_model_card
from hf_qad.nvfp4.calibration import calibrate
from hf_qad.nvfp4.gptq import gptq
from hf_qad.nvfp4.linear import NVFP4Linear
from hf_qad.nvfp4.moe import NVFP4Experts
from hf_qad.quantizer import NVFP4Config, NVFP4HfQuantizer, nvfp4_quantizer, register
from hf_qad.quantizer.checkpoints import (
    MasterWeightCheckpointCallback,
    load_packed_model,
    master_weight_checkpoint,
    unpack_model,
)
from hf_qad.quantizer.peft import NVFP4LoraLinear, register_nvfp4_lora, teacher_mode
from hf_qad.version import __version__


register()


def __getattr__(name: str):
    # The trainer pulls in TRL; import it only when asked for, so that loading and
    # serving NVFP4 models does not pay for it.
    if name in ("QADConfig", "QADTrainer"):
        from hf_qad import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'hf_qad' has no attribute {name!r}")


__all__ = [
    "MasterWeightCheckpointCallback",
    "NVFP4Config",
    "NVFP4Experts",
    "NVFP4HfQuantizer",
    "NVFP4Linear",
    "NVFP4LoraLinear",
    "QADConfig",
    "QADTrainer",
    "attach_model_card",
    "__version__",
    "calibrate",
    "gptq",
    "load_packed_model",
    "master_weight_checkpoint",
    "nvfp4_quantizer",
    "register_nvfp4_lora",
    "save_modelopt_checkpoint",
    "teacher_mode",
    "unpack_model",
    "write_model_card",
]
