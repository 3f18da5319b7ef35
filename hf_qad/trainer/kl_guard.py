"""The held-out KL guard: measure where QAD starts and warn when training makes the student worse.

A learning rate that suits one model can diverge on another (a 270M model spiked from KL 0.36 to
1.28 at a learning rate that was best on SmolLM2, see ``benchmarks/RESULTS.md``), and the training
loss alone does not say whether the student is still better than the PTQ model it started from.
With an ``eval_dataset``, :class:`KLGuardCallback` therefore evaluates the calibrated PTQ student
before the first step (``eval_kl`` at step 0), and at every later evaluation:

* :class:`~hf_qad.trainer.QADTrainer` logs ``eval_kl_ratio``, the held-out KL over the start's;
* the callback warns, naming the step and the learning rate, when the ratio is above 1.

Example:
    >>> import logging
    >>> from transformers import TrainerControl, TrainerState, TrainingArguments
    >>> guard = KLGuardCallback(trainer=None)
    >>> args, state = TrainingArguments("out", learning_rate=1e-4, report_to=[]), TrainerState()
    >>> guard.on_evaluate(args, state, TrainerControl(), metrics={"eval_kl": 0.36})  # step 0: the start
    >>> guard.start_kl
    0.36
    >>> state.global_step = 4
    >>> guard.on_evaluate(args, state, TrainerControl(), metrics={"eval_kl": 1.28})  # warns
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

__all__ = ["KLGuardCallback", "logged_start_kl"]

logger = logging.getLogger("hf_qad")


def logged_start_kl(log_history: list[dict[str, Any]]) -> float | None:
    """The ``eval_kl`` logged at step 0 (the PTQ starting point) in a Trainer's log history, if any.

    Example:
        >>> logged_start_kl([{"eval_kl": 0.3, "step": 0}, {"eval_kl": 0.2, "step": 10}])
        0.3
    """
    return next((entry["eval_kl"] for entry in log_history if entry.get("step") == 0 and "eval_kl" in entry), None)


class KLGuardCallback(TrainerCallback):
    """Evaluates the student before the first step and warns when an evaluation finds it worse than that.

    Added by :class:`~hf_qad.trainer.QADTrainer` (after its calibration and warm-start callback, so the
    starting point is the calibrated PTQ student, or the warmed one with ``warm_start_steps``: the guard
    checks the end-to-end steps, which are what can undo a warm start) when ``args.kl_guard`` is on and it
    has a single ``eval_dataset``. The start is re-read from the log history when training resumes from a
    checkpoint, so a resumed run is still compared with the PTQ student, not with its checkpoint.

    Args:
        trainer: the trainer to evaluate at the start (``None``: only compare, as in the example above).

    Attributes:
        start_kl: held-out KL of the PTQ student, ``None`` until measured.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.start_kl: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resumed: the start was logged by the run that began at step 0
            self.start_kl = logged_start_kl(state.log_history)
            return
        self.start_kl = None
        # eval_on_start evaluates right after on_train_begin, through the same evaluate().
        if not args.eval_on_start:
            self.trainer.evaluate()

    def on_evaluate(self, args, state, control, metrics=None, optimizer=None, **kwargs):
        kl = (metrics or {}).get("eval_kl")
        if kl is None:
            return
        if state.global_step == 0:
            self.start_kl = kl
            logger.info("hf_qad: held-out KL of the PTQ student before training: %.4g", kl)
            return
        if self.start_kl is None or kl <= self.start_kl:
            return
        rate = optimizer.param_groups[0]["lr"] if optimizer is not None else args.learning_rate
        logger.warning(
            "hf_qad: at step %d (learning rate %.3g, learning_rate=%g) the held-out KL is %.4g, %.2fx the PTQ "
            "student's %.4g before training: QAD has made the student worse than where it started. Lower "
            "learning_rate (e.g. to %g) and train again from the start.",
            state.global_step, rate, args.learning_rate, kl, kl / self.start_kl, self.start_kl,
            args.learning_rate / 10,
        )
