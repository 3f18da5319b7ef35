"""``QADTrainer``: TRL's ``SFTTrainer`` with a BF16 teacher and a distillation loss.

An SFT script becomes an NVFP4 QAD run by two changes::

    trainer = SFTTrainer(model=..., args=SFTConfig(...), train_dataset=ds)
    # becomes
    trainer = QADTrainer(model=..., teacher=bf16_path, args=QADConfig(...), train_dataset=ds)

Everything SFTTrainer does with the data (text, conversational, prompt/completion,
pre-tokenized; packing and padding-free; completion/assistant-only masks) is unchanged:
the loss is taken over exactly the tokens SFT would train on (``labels != -100`` after
the shift), with SFT's normalization (tokens across gradient accumulation and processes).

Two more kinds of run take the same swap:

* **Prompt-only datasets** (a ``prompt`` column only, text or messages, as GRPO uses): the
  completions are generated during training, by the teacher or, with probability
  ``args.lmbda`` per batch, on-policy by the quantized student, and the loss covers the
  generated tokens only (see :mod:`hf_qad.trainer.generation`).
* **Offline teacher**: with ``args.teacher_cache_path`` (made by
  :func:`hf_qad.trainer.teacher_cache.build_teacher_cache`), no teacher is loaded and the
  loss is the top-k KL against the cached teacher log-probabilities.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import torch
import torch.nn as nn
from accelerate.utils import fsdp2_prepare_model
from peft import LoraConfig, PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback, TrainingArguments
from trl import SFTTrainer
from trl.models import prepare_deepspeed, prepare_fsdp, unwrap_model_for_generation
from trl.models.utils import _ForwardRedirection

from hf_qad.export.model_card import write_model_card
from hf_qad.nvfp4.calibration import calibrate
from hf_qad.nvfp4.gptq import gptq
from hf_qad.nvfp4.conversion import nvfp4_experts, nvfp4_modules
from hf_qad.quantizer.checkpoints import MasterWeightCheckpointCallback, is_packed_export
from hf_qad.quantizer.peft import causal_lm, register_nvfp4_lora, teacher_mode
from hf_qad.quantizer.quantizer import NVFP4HfQuantizer
from hf_qad.trainer.generation import (
    PromptCollator,
    completion_rows,
    generate_completions,
    is_prompt_batch,
    is_prompt_only,
    tokenize_prompts,
)
from hf_qad.trainer.kl_guard import KLGuardCallback
from hf_qad.trainer.losses import DistillationSums, cached_distillation_loss, chunked_distillation_loss
from hf_qad.trainer.qad_config import QADConfig
from hf_qad.trainer.routing import is_moe, router_agreement_sums, router_aux_loss, top_k_experts
from hf_qad.trainer.teacher_cache import CACHE_COLUMNS, TeacherCacheCollator, attach_teacher_cache, read_cache_info
from hf_qad.trainer.warm_start import block_warm_start

__all__ = ["QADTrainer"]

logger = logging.getLogger("hf_qad")

# Inputs the SFT collators produce that are not model arguments.
_NON_MODEL_KEYS = {
    "labels", "shift_labels", "completion_mask", "assistant_masks", "num_items_in_batch", *CACHE_COLUMNS
}


def _drop_int8_cast_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def _is_peft(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)


def _model_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The batch's model arguments: what the student and the teacher are called with."""
    return {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS and k != "use_cache"}


def _backbone(model: nn.Module, inputs: dict[str, Any], router_logits: bool = False) -> Any:
    """A causal LM's backbone outputs (final hidden states, and router logits if asked), without its head."""
    extra = {"output_router_logits": True} if router_logits else {}
    return causal_lm(model).base_model(**inputs, use_cache=False, **extra)


def _vocab_rows(model: nn.Module) -> int:
    weight = causal_lm(model).get_output_embeddings().weight
    # ZeRO-3 leaves an empty placeholder in a partitioned parameter; ds_shape is its real shape.
    return getattr(weight, "ds_shape", weight.shape)[0]


def _nonfinite_summary(model: nn.Module, field: str) -> str | None:
    """Which parameters hold NaN/Inf in ``field`` (``"grad"`` or ``"data"``) on this process, or None.

    Looks at the local values: a process's shard under FSDP2 (DTensor), its partition under ZeRO-3.
    Clipping by a NaN norm spreads NaN to every gradient, so the count tells a local NaN from a
    spread one.
    """
    names = []
    total = 0
    for name, parameter in model.named_parameters():
        value = getattr(parameter, "ds_tensor", parameter) if field == "data" else parameter.grad
        if value is None:
            continue
        total += 1
        value = value.to_local() if hasattr(value, "to_local") else value
        if not torch.isfinite(value).all():
            names.append(name)
    if not names:
        return None
    what = "gradients" if field == "grad" else "values"
    return f"{len(names)} of {total} parameters have non-finite {what}, the first: {names[0]}"


def check_resumable(path: str) -> None:
    """Raise ``ValueError`` when ``path`` holds a packed NVFP4 export, which training cannot resume from.

    Loading its packed weights as a checkpoint would leave the student at its initial BF16 weights.
    """
    if is_packed_export(path):
        raise ValueError(
            f"{path} holds a packed NVFP4 export, not a training checkpoint (no master weights to resume "
            "from): resume from a checkpoint-N folder written during training."
        )


class _StartCallback(TrainerCallback):
    """Calibrates W4A4 input scales when training begins, through the prepared model, then warm-starts.

    Not before: under FSDP and ZeRO-3 the student's parameters are only usable once it is
    sharded (ZeRO-3 partitions them at load time), and it is on its device only then. The
    block-wise warm start (``warm_start_steps``) needs the calibrated scales, so it runs second,
    and only at step 0: a resumed run's checkpoint already holds the trained weights.
    """

    def __init__(self, trainer: QADTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._calibrate_if_needed(first_step=state.global_step == 0)
        if state.global_step == 0:
            self.trainer._warm_start_if_needed()


class QADTrainer(SFTTrainer):
    """Quantization-aware distillation of an NVFP4 student from its BF16 teacher.

    Args:
        model: an NVFP4 fake-quant model (``from_pretrained(..., quantization_config=NVFP4Config())``)
            or a path / hub id, loaded with ``args.nvfp4_config()``.
        teacher: the BF16 teacher: a model or a path. ``None``: ``args.teacher_model_name_or_path``,
            else the student's own checkpoint; with ``peft_config`` (LoRA QAD) the student itself with
            adapters and quantizers switched off, so one copy of the base weights is in memory.
        args: a :class:`QADConfig` (a plain ``SFTConfig``/``TrainingArguments`` is converted).
        **kwargs: everything else ``SFTTrainer`` takes (train/eval datasets, processing_class,
            data_collator, peft_config, callbacks, formatting_func, ...), unchanged.

    The teacher runs in eval mode, frozen and without gradients, gets the same inputs as the
    student (position ids included, ``use_cache=False``) and is never saved. Periodic
    checkpoints hold master weights (resumable); ``save_model``/``push_to_hub`` write the
    packed NVFP4 export.
    """

    _tag_names = ["trl", "sft", "hf_qad", "qad", "nvfp4"]
    _name = "QAD"

    def __init__(
        self,
        model: str | nn.Module,
        teacher: str | nn.Module | None = None,
        args: QADConfig | TrainingArguments | None = None,
        *sft_args: Any,
        callbacks: list | None = None,
        peft_config: Any = None,
        **sft_kwargs: Any,
    ) -> None:
        args = self._as_qad_config(model, args)
        self._resolve_router_aux_loss(model, args)
        teacher_source = teacher if teacher is not None else args.teacher_model_name_or_path
        cached = args.teacher_cache_path is not None
        if cached and teacher_source is not None:
            raise ValueError("teacher_cache_path replaces the teacher: pass either a teacher or the cache, not both.")
        lora = peft_config is not None or (not isinstance(model, str) and _is_peft(model))
        if isinstance(model, str) and sft_kwargs.get("quantization_config") is None:
            # TRL's scripts pass quantization_config=None explicitly when no bitsandbytes flag is set.
            sft_kwargs["quantization_config"] = args.nvfp4_config()
        if teacher_source is None and not lora and not cached:
            # The usual QAD setup: the student's own high-precision checkpoint is the teacher.
            teacher_source = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
            if not teacher_source:
                raise ValueError("pass teacher= (the BF16 model or its path): the student has no checkpoint path.")
        if isinstance(peft_config, LoraConfig):
            register_nvfp4_lora(peft_config)  # cached frozen base, merge checks (see hf_qad.quantizer.peft)
        callbacks = [MasterWeightCheckpointCallback(), *(callbacks or [])]
        self._prompt_data = False  # set by _prepare_dataset when a dataset is prompt-only
        super().__init__(model, args, *sft_args, callbacks=callbacks, peft_config=peft_config, **sft_kwargs)
        self._check_student()
        self.add_callback(_StartCallback(self))
        # After calibration and the warm start (callbacks run in order): the guard's starting point is the
        # calibrated PTQ student, warmed when warm_start_steps > 0 (see QADConfig.kl_guard).
        self.kl_guard = KLGuardCallback(self) if args.kl_guard and self._single_eval_dataset() else None
        if self.kl_guard is not None:
            self.add_callback(self.kl_guard)
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            self._register_fused_peers_with_zero3()
        self.shared_teacher = teacher_source is None and not cached
        self._check_warm_start()
        self.teacher_model = None if teacher_source is None else self._prepare_teacher(teacher_source)
        self._moe = is_moe(causal_lm(self.model))
        self._check_vocabulary()
        if cached:
            self._use_teacher_cache(args.teacher_cache_path)
        if self._prompt_data:
            self._use_prompt_collator()
        if not hasattr(self, "_forward_redirection"):
            self._forward_redirection = _ForwardRedirection()

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _as_qad_config(model: str | nn.Module, args: Any) -> QADConfig:
        if isinstance(args, QADConfig):
            return args
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            return QADConfig(f"{str(name).rstrip('/').split('/')[-1]}-QAD")
        if isinstance(args, TrainingArguments):
            values = args.to_dict()
            # to_dict masks every *_token field ("<EOS_TOKEN>" for SFTConfig's eos_token too), not just secrets.
            values.update({k: getattr(args, k) for k in values if k.endswith("_token")})
            known = QADConfig.__dataclass_fields__
            return QADConfig(**{k: v for k, v in values.items() if k in known and known[k].init})
        raise TypeError(f"args must be a QADConfig, SFTConfig or TrainingArguments, got {type(args).__name__}.")

    @staticmethod
    def _resolve_router_aux_loss(model: str | nn.Module, args: QADConfig) -> None:
        """Turn ``router_aux_loss_coef=None`` into a number before SFTTrainer reads it (see QADConfig).

        SFTTrainer takes ``None`` as "the model's coefficient" for every MoE model and then overwrites the
        config's ``output_router_logits``, so whether the user asked for router logits is read here, first.
        """
        if args.router_aux_loss_coef is not None:
            return
        if isinstance(model, str):  # loaded by SFTTrainer with model_init_kwargs, which may ask for router logits
            init_kwargs = args.model_init_kwargs or {}
            config = AutoConfig.from_pretrained(
                model, revision=init_kwargs.get("revision"), trust_remote_code=args.trust_remote_code
            ).get_text_config()
            asked = init_kwargs.get("output_router_logits", getattr(config, "output_router_logits", False))
        else:
            config = model.config.get_text_config()
            asked = getattr(config, "output_router_logits", False)
        args.router_aux_loss_coef = getattr(config, "router_aux_loss_coef", 0.0) if asked else 0.0

    def _single_eval_dataset(self) -> bool:
        if isinstance(self.eval_dataset, dict):
            # SFTTrainer logs every dataset's KL as eval_kl, so one starting point cannot stand for them all.
            logger.info("hf_qad: kl_guard covers a single eval_dataset; it is off for a dict of them.")
            return False
        return self.eval_dataset is not None

    def _check_student(self) -> None:
        if not nvfp4_modules(self.model):
            logger.warning(
                "QADTrainer: the student has no NVFP4 layers, so this is plain distillation, not QAD. "
                "Load it with from_pretrained(..., quantization_config=hf_qad.NVFP4Config())."
            )

    def _prepare_teacher(self, teacher: str | nn.Module) -> nn.Module:
        if isinstance(teacher, str):
            kwargs = dict(self.args.teacher_model_init_kwargs or {})
            kwargs.setdefault("dtype", causal_lm(self.model).dtype)
            teacher = AutoModelForCausalLM.from_pretrained(teacher, **kwargs)
        if isinstance(getattr(teacher, "hf_quantizer", None), NVFP4HfQuantizer) or nvfp4_modules(teacher):
            raise ValueError(
                "the teacher is NVFP4-quantized; QAD distills from the high-precision (BF16) model. "
                "Pass the BF16 checkpoint as teacher=."
            )
        if getattr(teacher, "is_loaded_in_8bit", False):
            # bitsandbytes logs a warning on every int8 matmul whose input is not float16, i.e. for
            # each Linear of every teacher forward: the cast is expected, so it is said once here.
            logger.info("hf_qad: the 8-bit teacher's int8 matmuls cast their inputs to float16.")
            logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_int8_cast_warning)
        teacher.eval()
        teacher.requires_grad_(False)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled and self.accelerator.is_fsdp2:
            # Not TRL's prepare_fsdp: it shards the teacher as one unit resharded after forward, so the head,
            # applied after the redirected backbone forward, would meet a sharded weight. accelerate's student
            # layout (per-layer units, final norm and head kept gathered after forward) serves the teacher too.
            return fsdp2_prepare_model(self.accelerator, teacher).eval()
        if self.is_fsdp_enabled:
            return prepare_fsdp(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _register_fused_peers_with_zero3(self) -> None:
        # ZeRO-3 gathers a module's own parameters for its forward, but an NVFP4 layer also reads the
        # weights of its fused peers (q/k/v, gate/up) for their shared global scale.
        import deepspeed

        for layer in nvfp4_modules(self.model).values():
            for peer in layer.global_scale_peers:
                deepspeed.zero.register_external_parameter(layer, peer.weight)

    def _check_warm_start(self) -> None:
        if not self.args.warm_start_steps:
            return
        if self.shared_teacher:
            raise ValueError(
                "warm_start_steps needs a separate teacher, and LoRA QAD shares the student's base as its teacher: "
                "pass teacher= (the BF16 model) or set warm_start_steps=0."
            )
        if self.accelerator.num_processes > 1 or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            # Each process would warm its copy on its own data shard and the replicas would differ.
            raise ValueError(
                "warm_start_steps runs in a single process: warm-start the student with "
                "hf_qad.trainer.warm_start.block_warm_start before a distributed run, or set warm_start_steps=0."
            )

    def _check_vocabulary(self) -> None:
        if self.teacher_model is None:
            return
        student_vocab = _vocab_rows(self.model)
        teacher_model = self.accelerator.unwrap_model(self.teacher_model)
        teacher_vocab = _vocab_rows(teacher_model)
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"teacher and student vocabularies differ ({teacher_vocab} vs {student_vocab} logits): QAD "
                "compares their token distributions, so both must use the same tokenizer."
            )
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        for name in ("bos_token_id", "eos_token_id"):
            s, t = getattr(tokenizer, name, None), getattr(teacher_model.config, name, None)
            if s is not None and t is not None and s != t and not (isinstance(t, list) and s in t):
                raise ValueError(
                    f"teacher config {name}={t} differs from the student tokenizer's {s}: the teacher "
                    "was trained with another tokenizer."
                )

    def _use_teacher_cache(self, path: str) -> None:
        if self.eval_dataset is not None:
            raise ValueError(
                "teacher_cache_path covers the training set only and no teacher is loaded to evaluate with: "
                "drop eval_dataset (evaluate afterwards with hf_qad.evaluation) or train with a teacher."
            )
        self.train_dataset = attach_teacher_cache(self.train_dataset, path, vocab_size=_vocab_rows(self.model))
        self.data_collator = TeacherCacheCollator(self.data_collator, read_cache_info(path).top_k)

    # ------------------------------------------------------------------ data
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        # SFTTrainer fails on a prompt-only dataset (no completion to tokenize): tokenize its prompts instead.
        if formatting_func is not None or not is_prompt_only(dataset, args.dataset_text_field):
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if packing or args.teacher_cache_path is not None:
            raise ValueError(
                f"the {dataset_name} dataset is prompt-only: its completions are generated during training, so it "
                "can be neither packed nor cached (set packing=False and teacher_cache_path=None)."
            )
        max_prompt_length = None
        if args.max_length is not None:
            if args.max_new_tokens >= args.max_length:
                raise ValueError(f"max_new_tokens ({args.max_new_tokens}) must be below max_length {args.max_length}.")
            max_prompt_length = args.max_length - args.max_new_tokens
        self._prompt_data = True
        if hasattr(self, "data_collator"):  # a dataset given to evaluate() after __init__
            self._use_prompt_collator()
        return tokenize_prompts(
            dataset, processing_class, chat_template=self.chat_template, max_prompt_length=max_prompt_length
        )

    def _use_prompt_collator(self) -> None:
        if not isinstance(self.data_collator, PromptCollator):
            self.data_collator = PromptCollator(self._tokenizer.pad_token_id, fallback=self.data_collator)

    def _set_signature_columns_if_needed(self) -> None:
        # Keep the prompt and cache columns when remove_unused_columns drops what the model does not take.
        super()._set_signature_columns_if_needed()
        extra = [c for c in ("prompt_ids", *CACHE_COLUMNS) if c not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *extra]

    # ------------------------------------------------------------------ generation (prompt-only datasets)
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        # Completions for the whole accumulation window are generated before its first backward, so that
        # num_items_in_batch counts the generated tokens of every micro-batch (prompts have no labels to count).
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not any(is_prompt_batch(batch) for batch in batches):
            return batches, num_items_in_batch
        batches = [
            self._complete_prompts(batch, self._on_policy(index)) if is_prompt_batch(batch) else batch
            for index, batch in enumerate(batches)
        ]
        return batches, self._get_num_items_in_batch(batches, device)

    def _prepare_inputs(self, inputs):
        # Evaluation batches of a prompt-only dataset reach here as prompts: they get teacher completions.
        if is_prompt_batch(inputs):
            inputs = self._complete_prompts(inputs, on_policy=False)
        return super()._prepare_inputs(inputs)

    def _on_policy(self, index: int) -> bool:
        """Whether micro-batch ``index`` of this step is generated by the student (probability ``lmbda``).

        Drawn from (seed, step, index) rather than a global RNG, so every process draws the same
        (ZeRO-3 generation runs in lockstep) and a resumed run repeats the draws.
        """
        return random.Random(f"{self.args.seed}:{self.state.global_step}:{index}").random() < self.args.lmbda

    @contextlib.contextmanager
    def _generator(self, on_policy: bool) -> Iterator[nn.Module]:
        """The model that writes completions, unwrapped for ``generate``: the student, or the teacher."""
        source = self.model_wrapped if on_policy or self.shared_teacher else self.teacher_model
        mode = contextlib.nullcontext() if on_policy else self._teacher()  # LoRA: the base in teacher mode
        with mode, unwrap_model_for_generation(
            source, self.accelerator, gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
        ) as model:
            yield model

    def _eos_token_ids(self) -> list[int]:
        """The tokenizer's EOS and the model's generation EOS tokens (chat models often have several)."""
        configured = causal_lm(self.accelerator.unwrap_model(self.model)).generation_config.eos_token_id
        configured = [] if configured is None else [configured] if isinstance(configured, int) else configured
        return sorted({self._tokenizer.eos_token_id, *configured} - {None})

    def _complete_prompts(self, batch: dict[str, Any], on_policy: bool) -> dict[str, Any]:
        """A prompt batch turned into an SFT batch of prompt + generated completion (loss on the completion)."""
        with self._generator(on_policy) as model:
            completions = generate_completions(
                model,
                batch["input_ids"].to(model.device),
                batch["attention_mask"].to(model.device),
                max_new_tokens=self.args.max_new_tokens,
                temperature=self.args.generation_temperature,
                pad_token_id=self._tokenizer.pad_token_id,
                eos_token_ids=self._eos_token_ids(),
            )
        return self.data_collator.fallback(completion_rows(batch["input_ids"], batch["attention_mask"], completions))

    # ------------------------------------------------------------------ calibration
    def _calibrate_if_needed(self, first_step: bool = True) -> None:
        """Calibrate W4A4 input scales if not done yet; then, before a run's first step, round with GPTQ if asked."""
        modules = [*nvfp4_modules(self.model).values(), *nvfp4_experts(self.model).values()]
        layers = [m for m in modules if m.quantize_activations]
        calibrating = bool(layers) and not all(m.input_calibrated for m in layers) and self.args.calibration_batches > 0
        rounding = first_step and self.args.nvfp4_weight_rounding == "gptq"
        if not calibrating and not rounding:
            return
        model_keys = None
        batches = []
        for batch in islice(self.get_train_dataloader(), self.args.calibration_batches):
            model_keys = model_keys or [k for k in batch if k not in _NON_MODEL_KEYS]
            batches.append({k: batch[k] for k in model_keys})
        with self.accelerator.autocast():  # the precision of the training forward (see compute_loss)
            if calibrating:
                amax = calibrate(self.model_wrapped, batches, num_batches=None)
                logger.info("hf_qad: calibrated %d W4A4 layers on %d batches", len(amax), len(batches))
            if rounding:
                rounded = gptq(self.model_wrapped, batches, num_batches=None)
                gain = sum(r.gptq for r in rounded.values()) / max(sum(r.nearest for r in rounded.values()), 1e-30)
                logger.info("hf_qad: GPTQ rounded %d layers on %d batches (output error %.2fx nearest rounding's)",
                            len(rounded), len(batches), gain)

    def _warm_start_if_needed(self) -> None:
        """The block-wise warm start (``args.warm_start_steps``) on the first training batches."""
        if not self.args.warm_start_steps:
            return
        batches = [{k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
                   for batch in islice(self.get_train_dataloader(), self.args.warm_start_batches)]
        student = self.accelerator.unwrap_model(self.model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with self.accelerator.autocast():  # the precision of the training forward (see compute_loss)
            errors = block_warm_start(student, teacher, batches, steps=self.args.warm_start_steps,
                                      lr=self.args.warm_start_learning_rate, scale_lr=self.args.scale_learning_rate)
        logger.info(
            "hf_qad: warm-started %d decoder layers on %d batches; last layer's error %.4g -> %.4g",
            len(errors), len(batches), errors[-1].before, errors[-1].after,
        )

    # ------------------------------------------------------------------ optimizer
    def _clip_parameters(self, model: nn.Module) -> set[int]:
        """Ids of the trainable learned clipping factors (NVFP4Config(learn_scales=True))."""
        return {id(p) for layer in nvfp4_modules(model).values() for p in layer.clip_parameters.values()
                if p.requires_grad}

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        # Weight decay would pull the clipping factors towards 0, i.e. every block scale towards zero.
        clips = self._clip_parameters(model)
        names = super().get_decay_parameter_names(model)
        return [name for name, p in model.named_parameters() if name in names and id(p) not in clips]

    def create_optimizer(self, model=None):
        # The Trainer builds its (decay, no decay) groups; the clipping factors move to a group of their own
        # with scale_learning_rate, before any step and before the scheduler reads each group's rate.
        optimizer = super().create_optimizer(model)
        clips = self._clip_parameters(self.model if model is None else model)
        if not clips or any(group.get("hf_qad_clips") for group in optimizer.param_groups):
            return optimizer
        moved = []
        for group in optimizer.param_groups:
            moved += [p for p in group["params"] if id(p) in clips]
            group["params"] = [p for p in group["params"] if id(p) not in clips]
        optimizer.add_param_group({"params": moved, "lr": self.args.scale_learning_rate, "weight_decay": 0.0,
                                   "hf_qad_clips": True})
        return optimizer

    # ------------------------------------------------------------------ non-finite values
    def _get_grad_norm(self, model, grad_norm=None):
        # The Trainer's last call before the optimizer step, with the norm its clipping computed (or computed here
        # without clipping): a non-finite norm stops the run before the update turns every weight NaN.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            # Clipping by an infinite norm multiplies the gradients by 0, which leaves the infinite ones NaN.
            detail = _nonfinite_summary(self.accelerator.unwrap_model(model), "grad") or (
                "DeepSpeed holds the gradients" if self.is_deepspeed_enabled
                else "every gradient is finite, their norm overflows"
            )
            raise FloatingPointError(
                f"the gradient norm is {float(grad_norm)} at step {self.state.global_step + 1}: {detail}. The update "
                "was not applied; lower the learning rate (or check the data) and resume from the last checkpoint."
            )
        return grad_norm

    def _save_checkpoint(self, model, trial):
        # Weights can also overflow from finite gradients (a huge learning rate): such a checkpoint is never
        # written, so save_total_limit cannot rotate away the last good one. Every rank checks its shard.
        problem = _nonfinite_summary(self.accelerator.unwrap_model(model), "data")
        if self.accelerator.gather(torch.tensor([int(problem is not None)], device=self.args.device)).any():
            raise FloatingPointError(
                f"not saving checkpoint-{self.state.global_step}: "
                f"{problem or 'another process has non-finite weights'}. "
                "Lower the learning rate and resume from the last checkpoint."
            )
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        check_resumable(resume_from_checkpoint)
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        quantizer = getattr(model, "hf_quantizer", None)
        # An empty state_dict: ZeRO-3 without 16-bit gathering, where the Trainer writes a placeholder.
        plain = _is_peft(model) or not self.args.should_save or state_dict == {}
        if not isinstance(quantizer, NVFP4HfQuantizer) or plain:
            return super()._save(output_dir, state_dict)
        # FSDP (FULL_STATE_DICT) and ZeRO-3 hand over the full weights gathered on this rank, but save_pretrained
        # of a quantized model saves the quantizer's state dict, read from the live parameters: shards.
        with quantizer.saving_state(state_dict) if state_dict is not None else contextlib.nullcontext():
            super()._save(output_dir, state_dict)
        if not quantizer.saving_master_weights:
            write_model_card(model, output_dir or self.args.output_dir, training=self._model_card_training())

    def _model_card_training(self) -> dict[str, Any]:
        """The QAD settings the model card lists."""
        args = self.args
        teacher = "the student's base, adapters and quantization off" if self.shared_teacher else (
            f"cache at {args.teacher_cache_path}" if self.teacher_model is None else
            getattr(self.accelerator.unwrap_model(self.teacher_model).config, "_name_or_path", None) or "given model")
        return {
            "teacher": teacher,
            "divergence": args.divergence,
            "temperature": args.temperature,
            "kl_weight": args.kl_weight,
            "ce_weight": args.ce_weight,
            "steps": self.state.global_step,
            "learning_rate": args.learning_rate,
        }

    # ------------------------------------------------------------------ loss
    @contextlib.contextmanager
    def _teacher(self) -> Iterator[nn.Module]:
        """The module that computes teacher hidden states (and its head), in teacher mode."""
        if not self.shared_teacher:
            yield self.teacher_model
            return
        with teacher_mode(self.model):
            yield self.model

    def _teacher_head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        head = causal_lm(self.accelerator.unwrap_model(self.teacher_model or self.model)).get_output_embeddings()

        def apply(hidden: torch.Tensor) -> torch.Tensor:
            with self._teacher():
                return head(hidden)

        return apply

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        labels = inputs["shift_labels"] if "shift_labels" in inputs else inputs["labels"][:, 1:]
        mask = labels != -100
        cached = CACHE_COLUMNS[0] in inputs  # offline teacher: its cached top-k, one entry per loss token
        teacher_hidden, teacher_experts = (None, None) if cached else self._teacher_outputs(inputs, mask)
        # MoE students return their router logits for the load-balancing loss and for router_agreement, which
        # needs the teacher's routing: a teacher cache holds its log-probabilities only, so it is not logged there.
        router_logits = self._moe and (self.aux_loss_enabled or teacher_experts is not None)
        unwrapped = self.accelerator.unwrap_model(model)
        # The student's whole loss, head included, runs inside the wrapped model's forward. Under DDP without
        # gradient checkpointing the Trainer sets find_unused_parameters=True, and DDP takes every parameter
        # it cannot reach from the forward's outputs as unused: a head applied after the forward would be
        # marked ready as unused, then again by its gradient ("Expected to mark a variable ready only once").
        # With the loss as the output, the head is in the graph DDP searches, so both settings work and
        # parameters a batch really leaves unused (MoE experts) are still found. (static_graph or
        # find_unused_parameters=False would also silence the error, but break on such models.)
        # The redirection also replaces the forward that accelerate wrapped in its mixed-precision autocast.
        with self.accelerator.autocast():
            sums, student_router_logits = self._forward_redirection(
                model, unwrapped, self._student_sums, unwrapped, inputs, labels, mask, teacher_hidden, router_logits
            )
        total = sums.loss
        tokens = torch.as_tensor(num_items_in_batch if num_items_in_batch is not None else sums.tokens)
        loss = total / tokens.to(total.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        aux_loss = None
        if self.aux_loss_enabled and student_router_logits is not None:
            # As SFTTrainer adds it: a per-micro-batch mean that DDP averages across ranks, averaged over the
            # accumulation steps when the Trainer leaves gradient accumulation to the loss (num_items_in_batch).
            aux_loss = router_aux_loss(causal_lm(unwrapped), student_router_logits, inputs.get("attention_mask"))
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device) / steps
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"QAD loss is {loss.item()} at step {self.state.global_step}: the student produced "
                "NaN/Inf. Lower the learning rate, check the data, or resume from the last checkpoint."
            )
        self._log_distillation_metrics(mode, sums)
        if student_router_logits is not None:
            agreement = None if teacher_experts is None else router_agreement_sums(
                student_router_logits, teacher_experts, mask
            )
            self._log_routing_metrics(mode, agreement, aux_loss)
        return (loss, None) if return_outputs else loss

    def _student_sums(
        self, student: nn.Module, inputs: dict[str, Any], labels: torch.Tensor, mask: torch.Tensor,
        teacher_hidden: torch.Tensor | None, router_logits: bool = False,
    ) -> tuple[DistillationSums, tuple[torch.Tensor, ...] | None]:
        """The loss sums of one batch from the student's forward (``teacher_hidden``: None with a teacher cache).

        With ``router_logits``, also the student's router logits per MoE layer (else None).
        """
        outputs = _backbone(student, _model_inputs(inputs), router_logits=router_logits)
        return self._distillation_sums(student, inputs, labels, mask, teacher_hidden, outputs.last_hidden_state), (
            outputs.router_logits if router_logits else None
        )

    def _distillation_sums(self, student: nn.Module, inputs: dict[str, Any], labels: torch.Tensor,
                           mask: torch.Tensor, teacher_hidden: torch.Tensor | None,
                           student_hidden: torch.Tensor) -> DistillationSums:
        """The loss sums from the student's final hidden states (all positions) and the teacher's (loss positions)."""
        # Position i predicts labels[:, i]: without shift_labels the last position predicts nothing.
        student_hidden = student_hidden[:, : labels.shape[1]][mask]
        student_head = causal_lm(student).get_output_embeddings()
        if teacher_hidden is None:  # against the batch's cached teacher top-k, one entry per loss token
            return cached_distillation_loss(
                student_hidden,
                student_head,
                *(inputs[column] for column in CACHE_COLUMNS),
                labels[mask],
                chunk_size=self.args.loss_chunk_size,
                kl_weight=self.args.kl_weight,
                ce_weight=self.args.ce_weight,
            )
        # The head matmuls run in the autocast dtype (compute_loss's autocast), as the model's lm_head would.
        return chunked_distillation_loss(
            student_hidden,
            student_head,
            teacher_hidden.to(student_hidden.device),
            self._teacher_head(),
            labels[mask],
            divergence=self.args.divergence,
            beta=self.args.beta,
            temperature=self.args.temperature,
            chunk_size=self.args.loss_chunk_size,
            kl_weight=self.args.kl_weight,
            ce_weight=self.args.ce_weight,
        )

    def _teacher_outputs(
        self, inputs: dict[str, Any], mask: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """The teacher's final hidden states at the loss positions ``mask`` picks, run on the student's inputs.

        And, for a MoE teacher of a MoE student, its top-k expert sets at those positions (else None).
        """
        if self.teacher_model is None and not self.shared_teacher:
            raise ValueError("this batch has no cached teacher outputs and no teacher is loaded.")
        model_inputs = _model_inputs(inputs)
        with torch.no_grad(), self.accelerator.autocast(), self._teacher() as teacher:
            unwrapped_teacher = self.accelerator.unwrap_model(teacher)
            routing = self._moe and is_moe(causal_lm(unwrapped_teacher))
            outputs = self._forward_redirection(
                teacher, unwrapped_teacher, _backbone, unwrapped_teacher, model_inputs, routing
            )
        experts = None
        if routing:
            top_k = causal_lm(unwrapped_teacher).config.get_text_config().num_experts_per_tok
            experts = top_k_experts(outputs.router_logits, top_k, mask)
        return outputs.last_hidden_state[:, : mask.shape[1]][mask], experts

    def _log_distillation_metrics(self, mode: str, sums) -> None:
        # One row of token sums per process, added up: gather, not gather_for_metrics, which takes the rows
        # for samples and, on the last batch of a dataloader, drops the ones past the dataset's end.
        gathered = self.accelerator.gather(
            torch.stack(
                [sums.kl, sums.top1_agreement, sums.student_nll, sums.teacher_nll,
                 torch.tensor(float(sums.tokens), device=sums.kl.device)]
            )[None]
        ).sum(0)
        count = gathered[4].item()
        if count == 0:
            return
        for name, value in zip(("kl", "top1_agreement", "student_ce", "teacher_ce"), gathered[:4]):
            self._metrics[mode][name].append(value.item() / count)
        start = self.kl_guard.start_kl if self.kl_guard is not None else None
        if mode == "eval" and start:
            # SFTTrainer.log averages each metric's per-batch values, so this averages to eval_kl / start.
            self._metrics[mode]["kl_ratio"].append(gathered[0].item() / count / start)

    def _log_routing_metrics(self, mode: str, agreement: tuple[torch.Tensor, int] | None,
                             aux_loss: torch.Tensor | None) -> None:
        # router_agreement: tokens x MoE layers whose top-k expert set is the teacher's, over all processes.
        # aux_loss: the unweighted load-balancing loss, averaged over processes as SFTTrainer logs it.
        if agreement is not None:
            matches, count = agreement
            gathered = self.accelerator.gather(
                torch.stack([matches, torch.tensor(float(count), device=matches.device)])[None]
            ).sum(0)
            if gathered[1].item() > 0:
                self._metrics[mode]["router_agreement"].append(gathered[0].item() / gathered[1].item())
        if aux_loss is not None:
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather(aux_loss.detach()[None]).mean().item())
