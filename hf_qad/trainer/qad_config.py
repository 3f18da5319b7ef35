"""``QADConfig``: ``SFTConfig`` plus the settings of quantization-aware distillation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

from hf_qad.quantizer.config import NVFP4Config
from hf_qad.trainer.losses import check_divergence

__all__ = ["QADConfig", "WEIGHT_ROUNDINGS"]

WEIGHT_ROUNDINGS = ("nearest", "gptq")
"""Values of :attr:`QADConfig.nvfp4_weight_rounding`."""


@dataclass
class QADConfig(SFTConfig):
    r"""Configuration for :class:`~hf_qad.QADTrainer`: every ``SFTConfig`` field, plus these.

    Parameters:
        learning_rate (`float`, defaults to `1e-5`):
            SFTConfig's field with the QAD paper's rate as default (SFT's is 2e-5): never worse than the PTQ
            start on the three models measured (Llama and Gemma 3 layouts), where larger rates made two of
            them worse (1e-4 and 3e-4; README, "How to pick a learning rate"). Larger rates can recover more per token on a given model: try them on a short
            run with an ``eval_dataset`` (the KL guard warns when the held-out KL rises above the start).
        teacher_model_name_or_path (`str` or `None`, defaults to `None`):
            The BF16 teacher, when ``QADTrainer`` gets no ``teacher=``. ``None``: the
            student's own high-precision checkpoint (the usual QAD setup), or, with a
            ``peft_config``, the student model itself with adapters and quantizers off.
        teacher_model_init_kwargs (`dict` or `None`, defaults to `None`):
            Keyword arguments for ``from_pretrained`` when the teacher is loaded from a path.
        nvfp4_scheme (`str`, defaults to `"w4a4"`):
            ``"w4a4"`` or ``"w4a16"``; used when the student is given as a path.
        nvfp4_scale_method (`str` or `None`, defaults to `None`):
            Weight block-scale method of a student given as a path: ``"amax"`` (each block's amax onto
            6, the QAD paper's recipe), ``"four_over_six"`` or ``"mse"`` (the best of 9 candidate scales
            per block, searched at every training forward and again at export). ``None``: ``"mse"``,
            which recovered more KL per training token and per CPU-second than ``"amax"`` at every
            budget measured on SmolLM2 and at every usable rate on a Gemma 3-layout model
            (``benchmarks/RESULTS.md``; a QAD step costs 1.1-1.8x on CPU), or ``"amax"``
            with ``nvfp4_learn_scales`` (learned clips start from the amax scales).
        nvfp4_modules_to_not_convert (`list[str]` or `None`, defaults to `None`):
            Modules kept in high precision; student given as a path. ``None``: NVFP4Config's defaults.
        nvfp4_learn_scales (`bool`, defaults to `False`):
            Learned NVFP4 scales (``NVFP4Config(learn_scales=True)``) for a student given as a path:
            trainable clipping factors in front of every weight block scale and every W4A4 input
            global scale, exported as learned. A student loaded by the caller learns its scales when
            it was loaded with that option.
        nvfp4_weight_rounding (`str`, defaults to `"nearest"`):
            How the student's weights are rounded before the first step: ``"nearest"`` (each weight to
            its nearest NVFP4 value) or ``"gptq"``: :func:`hf_qad.gptq` on the ``calibration_batches``
            first training batches, after calibration, which rounds so as to keep each layer's output
            on them (error compensation through the inputs' Hessian). Not when resuming a run. Needs
            whole weights on every process (single process or DDP; under DDP the Hessians are summed
            over ranks, so every rank rounds alike), and ``calibration_batches > 0``.
        scale_learning_rate (`float`, defaults to `1e-3`):
            Peak learning rate of the learned clipping factors (a parameter group of their own, no
            weight decay, the same schedule). A factor moves the block scale it multiplies by its own
            relative amount, and e4m3 block scales are 6-12% apart, so it needs a far larger rate
            than the weights.
        divergence (`str`, defaults to `"forward_kl"`):
            ``"forward_kl"`` (KL(teacher || student), the QAD paper's loss), ``"reverse_kl"`` or ``"jsd"``.
        beta (`float`, defaults to `0.5`):
            Mixture weight of the generalized JSD (teacher share), used when ``divergence="jsd"``.
        temperature (`float`, defaults to `1.0`):
            Softmax temperature of both models in the divergence; the divergence is multiplied by
            ``temperature**2`` so gradient scales stay comparable.
        kl_weight (`float`, defaults to `1.0`):
            Weight of the divergence term.
        ce_weight (`float`, defaults to `0.0`):
            Weight of the data's cross-entropy. ``kl_weight=0, ce_weight=1`` is plain QAT on the
            task loss, so QAD and QAT can be compared with one trainer.
        loss_chunk_size (`int`, defaults to `128`):
            Tokens per chunk of the loss; the loss's own memory peaks at about ``4 * chunk * vocab * 4``
            bytes (0.1 GB at chunk 128, vocabulary 49k), independent of the sequence length. Larger
            chunks save little time (see ``benchmarks/RESULTS.md``).
        calibration_batches (`int`, defaults to `8`):
            Training batches used to calibrate W4A4 activation scales before training, when the
            student is not calibrated yet. ``0`` skips calibration (per-batch scales, with a warning).
        lmbda (`float`, defaults to `0.0`):
            For prompt-only datasets: probability that a batch's completions are generated on-policy
            by the quantized student rather than by the teacher (as in GKD).
        max_new_tokens (`int`, defaults to `128`):
            Completion length generated for prompt-only datasets.
        generation_temperature (`float`, defaults to `1.0`):
            Sampling temperature for generated completions (prompt-only datasets); ``0`` is greedy.
        teacher_cache_path (`str` or `None`, defaults to `None`):
            A teacher cache made by :func:`hf_qad.trainer.teacher_cache.build_teacher_cache`: the
            teacher's top-k log-probabilities over the training set. No teacher is loaded; the loss
            is the top-k forward KL (needs ``divergence="forward_kl"``, ``temperature=1``, no packing).
        router_aux_loss_coef (`float` or `None`, defaults to `None`):
            Mixture-of-experts students: weight of the model's load-balancing loss, added to the QAD loss
            as SFTTrainer adds it to the cross-entropy (the model's own loss, per micro-batch, averaged over
            gradient accumulation). ``None``: off, unless the student was loaded with
            ``output_router_logits=True`` (in its config or ``model_init_kwargs``), then on with the model's
            own ``router_aux_loss_coef``; a number: that weight (``0`` off). Off by default: QAD trains the
            student to route and predict as its teacher does, and the balancing term pulls the routers
            elsewhere (SFTConfig's ``None`` turns it on for every MoE model). ``QADTrainer`` resolves it to a
            number when it starts.
        kl_guard (`bool`, defaults to `True`):
            With a single ``eval_dataset``: evaluate the calibrated PTQ student before the first step
            (``eval_kl`` at step 0), log ``eval_kl_ratio`` (held-out KL over that start) at every later
            evaluation, and warn, naming the step and the learning rate, when training has made the
            held-out KL worse than the start (see :mod:`hf_qad.trainer.kl_guard`). Costs one evaluation.
            With ``warm_start_steps``, the start is the warmed student: the guard checks the
            end-to-end learning rate, which is what can undo the warm start.
        warm_start_steps (`int`, defaults to `0`):
            Block-wise warm start before the first step (after calibration): Adam steps per decoder
            layer training it to reproduce the teacher's hidden states, one layer at a time
            (:func:`hf_qad.trainer.warm_start.block_warm_start`). ``0``: off (plain QAD from the PTQ
            student). Needs a separate teacher (not LoRA's shared one, not a teacher cache) and one process.
        warm_start_learning_rate (`float`, defaults to `1e-5`):
            Adam learning rate of the warm start's layer parameters (learned clipping factors use
            ``scale_learning_rate``).
        warm_start_batches (`int`, defaults to `8`):
            Training batches whose hidden states the warm start caches and cycles through (the first
            ones of the training dataloader, as calibration takes them).
    """

    learning_rate: float = field(
        default=1e-5, metadata={"help": "Peak learning rate (QAD's default 1e-5, safe on the models measured)."}
    )
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": "BF16 teacher path or hub id."})
    teacher_model_init_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "from_pretrained kwargs for the teacher."}
    )
    nvfp4_scheme: str = field(default="w4a4", metadata={"help": "w4a4 or w4a16."})
    nvfp4_scale_method: str | None = field(
        default=None, metadata={"help": "amax (the paper's recipe), four_over_six or mse. Default: mse (amax with "
                                        "learned scales)."}
    )
    nvfp4_modules_to_not_convert: list[str] | None = field(
        default=None, metadata={"help": "Modules kept in high precision."}
    )
    nvfp4_learn_scales: bool = field(default=False, metadata={"help": "Learn NVFP4 block and input scales."})
    nvfp4_weight_rounding: str = field(
        default="nearest", metadata={"help": "nearest or gptq: the weight rounding QAD starts from."}
    )
    scale_learning_rate: float = field(default=1e-3, metadata={"help": "Learning rate of learned scales."})
    divergence: str = field(default="forward_kl", metadata={"help": "forward_kl, reverse_kl or jsd."})
    beta: float = field(default=0.5, metadata={"help": "Teacher share of the JSD mixture."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the divergence."})
    kl_weight: float = field(default=1.0, metadata={"help": "Weight of the divergence."})
    ce_weight: float = field(default=0.0, metadata={"help": "Weight of the data cross-entropy (QAT)."})
    loss_chunk_size: int = field(default=128, metadata={"help": "Tokens per loss chunk."})
    calibration_batches: int = field(default=8, metadata={"help": "Batches to calibrate W4A4 scales."})
    lmbda: float = field(default=0.0, metadata={"help": "On-policy (student) generation probability."})
    max_new_tokens: int = field(default=128, metadata={"help": "Generated completion length."})
    generation_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0: greedy)."})
    teacher_cache_path: str | None = field(default=None, metadata={"help": "Offline teacher top-k cache."})
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "MoE load-balancing loss weight. None: the model's own coefficient if the student was "
                  "loaded with output_router_logits=True, else off. 0 turns it off."},
    )
    kl_guard: bool = field(
        default=True, metadata={"help": "Evaluate the PTQ student first; warn when the held-out KL rises above it."}
    )
    warm_start_steps: int = field(default=0, metadata={"help": "Block-wise warm start: Adam steps per layer (0: off)."})
    warm_start_learning_rate: float = field(default=1e-5, metadata={"help": "Learning rate of the warm start."})
    warm_start_batches: int = field(default=8, metadata={"help": "Training batches the warm start trains on."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_divergence(self.divergence, self.beta, self.temperature)
        if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight == 0:
            raise ValueError("kl_weight and ce_weight must be >= 0 and not both 0.")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda is a probability, got {self.lmbda}.")
        if self.max_new_tokens < 1 or self.generation_temperature < 0:
            raise ValueError("max_new_tokens must be positive and generation_temperature >= 0.")
        if self.teacher_cache_path is not None:
            self._check_teacher_cache_options()
        if not self.scale_learning_rate > 0:
            raise ValueError(f"scale_learning_rate must be positive, got {self.scale_learning_rate}.")
        self._check_warm_start_options()
        if self.nvfp4_weight_rounding not in WEIGHT_ROUNDINGS:
            raise ValueError(f"unknown nvfp4_weight_rounding {self.nvfp4_weight_rounding!r}; choose one of "
                             f"{', '.join(WEIGHT_ROUNDINGS)}.")
        if self.nvfp4_weight_rounding == "gptq" and self.calibration_batches < 1:
            raise ValueError("nvfp4_weight_rounding='gptq' rounds on the calibration batches: set calibration_batches > 0.")
        if self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be positive, got {self.loss_chunk_size}.")
        self.nvfp4_config()  # validates the NVFP4 options early

    def _check_teacher_cache_options(self) -> None:
        # The cache holds the teacher's top-k at temperature 1 for rows as prepared without packing.
        if self.divergence != "forward_kl" or self.temperature != 1.0:
            raise ValueError("teacher_cache_path supports divergence='forward_kl' at temperature=1.0 only.")
        if self.packing:
            raise ValueError("teacher_cache_path does not support packing: set packing=False (padding_free works).")

    def _check_warm_start_options(self) -> None:
        if self.warm_start_steps < 0:
            raise ValueError(f"warm_start_steps must be >= 0 (0: no warm start), got {self.warm_start_steps}.")
        if not self.warm_start_learning_rate > 0:
            raise ValueError(f"warm_start_learning_rate must be positive, got {self.warm_start_learning_rate}.")
        if self.warm_start_batches < 1:
            raise ValueError(f"warm_start_batches must be at least 1, got {self.warm_start_batches}.")
        if self.warm_start_steps and self.teacher_cache_path is not None:
            raise ValueError("warm_start_steps needs the teacher's layers, and teacher_cache_path loads no teacher: "
                             "set warm_start_steps=0 or train with a teacher.")

    def nvfp4_config(self) -> NVFP4Config:
        """The NVFP4Config used when the student is given as a path."""
        return NVFP4Config(
            scheme=self.nvfp4_scheme,
            scale_method=self.nvfp4_scale_method or ("amax" if self.nvfp4_learn_scales else "mse"),
            modules_to_not_convert=self.nvfp4_modules_to_not_convert,
            learn_scales=self.nvfp4_learn_scales,
        )
