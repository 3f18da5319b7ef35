"""Mixture-of-experts routing in QAD: the load-balancing loss and teacher/student router agreement.

A MoE backbone called with ``output_router_logits=True`` returns one ``[tokens, experts]`` logits
tensor per MoE layer (transformers records them from the router modules); both functions here take
those tuples, so they work for every architecture transformers records router logits for
(Qwen-MoE, Mixtral, gpt-oss, DeepSeek-style, ...).

* :func:`router_aux_loss` is the model's own load-balancing loss, the one its ``ForCausalLM.forward``
  (and TRL's SFTTrainer) adds to the cross-entropy with ``router_aux_loss_coef``.
* :func:`router_agreement_sums` counts the tokens whose top-k expert set is the same for the
  teacher and the student: quantization moves the router's inputs, so a student can send a token
  to other experts than its teacher did even with identical router weights.

Example:
    >>> import torch
    >>> teacher = (torch.tensor([[3.0, 2.0, 0.0, 1.0], [0.0, 1.0, 2.0, 3.0]]),)  # 1 layer, 2 tokens, 4 experts
    >>> student = (torch.tensor([[2.0, 3.0, 1.0, 0.0], [3.0, 1.0, 2.0, 0.0]]),)
    >>> positions = torch.tensor([[True, True]])
    >>> matches, count = router_agreement_sums(student, top_k_experts(teacher, 2, positions), positions)
    >>> matches.item(), count  # token 0 goes to {0, 1} in both, token 1 to {2, 3} vs {0, 2}
    (1.0, 2)
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import PretrainedConfig

__all__ = ["is_moe", "router_agreement_sums", "router_aux_loss", "top_k_experts"]


def _text_config(model: nn.Module) -> PretrainedConfig:
    return model.config.get_text_config()


def is_moe(model: nn.Module) -> bool:
    """Whether ``model`` routes tokens to experts and can return its router logits (TRL's test, plus top-k)."""
    config = _text_config(model)
    return hasattr(config, "output_router_logits") and hasattr(config, "num_experts_per_tok")


def router_aux_loss(
    model: nn.Module, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """The model's load-balancing loss (unweighted) from its router logits, as its own forward computes it.

    transformers' MoE families all take Mixtral's ``load_balancing_loss_func`` through its modular
    system, as TRL's fused-head forward does; the expert counts come from the model's text config.
    ``attention_mask`` excludes padding (``None`` with padding-free batches: every token counts).
    """
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    config = _text_config(model)
    return load_balancing_loss_func(router_logits, config.num_experts, config.num_experts_per_tok, attention_mask)


def top_k_experts(
    router_logits: tuple[torch.Tensor, ...], top_k: int, positions: torch.Tensor
) -> list[torch.Tensor]:
    """Each layer's expert set per token at ``positions``: ``[tokens, top_k]`` sorted expert indices.

    ``router_logits``: per layer ``[batch * seq, experts]`` for a ``[batch, seq]`` batch;
    ``positions``: a ``[batch, seq']`` boolean mask (``seq' <= seq``, the loss positions). The top-k
    of the logits is the router's choice for softmax-then-top-k and top-k-then-softmax routers alike;
    a router that adds a selection bias (DeepSeek-V3) chooses by biased scores, which this ignores.
    """
    batch, length = positions.shape
    sets = []
    for logits in router_logits:
        per_token = logits.detach().reshape(batch, -1, logits.shape[-1])[:, :length][positions.to(logits.device)]
        sets.append(per_token.topk(top_k, dim=-1).indices.sort(dim=-1).values)
    return sets


def router_agreement_sums(
    student_logits: tuple[torch.Tensor, ...], teacher_sets: list[torch.Tensor], positions: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """Tokens whose top-k expert set is the teacher's, summed over MoE layers, and the tokens x layers counted.

    ``teacher_sets`` comes from :func:`top_k_experts` on the teacher's router logits at the same
    ``positions``; their ratio, over a batch, is ``router_agreement``.
    """
    if len(student_logits) != len(teacher_sets):
        raise ValueError(
            f"the student has {len(student_logits)} MoE layers and the teacher {len(teacher_sets)}: "
            "router agreement compares the same architecture."
        )
    top_k = teacher_sets[0].shape[-1] if teacher_sets else 1
    student_sets = top_k_experts(student_logits, top_k, positions)
    matches = sum(
        ((s == t.to(s.device)).all(dim=-1).sum() for s, t in zip(student_sets, teacher_sets)),
        torch.zeros((), device=positions.device),
    )
    return matches.float(), sum(s.shape[0] for s in student_sets)
