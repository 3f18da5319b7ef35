"""Offline teacher cache: exact at top_k = vocab, close at small k, aligned with the batches, no teacher loaded."""

import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM

from hf_qad import NVFP4Config
from hf_qad.trainer import QADConfig, QADTrainer
from hf_qad.trainer.losses import cached_distillation_loss, chunked_distillation_loss, token_divergence
from hf_qad.trainer.teacher_cache import TeacherCacheCollator, build_teacher_cache, teacher_topk
from tests.tiny_models import TEXTS, VOCAB, tiny_tokenizer

COMMON = dict(use_cpu=True, report_to=[], save_strategy="no", seed=0, logging_steps=1, dataloader_drop_last=True,
              nvfp4_scheme="w4a16", per_device_train_batch_size=4, learning_rate=1e-3, max_steps=2)
DATA = Dataset.from_dict({"prompt": [t[:10] for t in TEXTS], "completion": [t[10:] for t in TEXTS]})


def _config(tmp_path, **overrides):
    return QADConfig(str(tmp_path / "out"), **{**COMMON, **overrides})


def _model(path, quantized=True):
    config = NVFP4Config(scheme="w4a16") if quantized else None
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)


def _build(tiny_path, tmp_path, data=DATA, name="cache", **kwargs):
    options = {"top_k": VOCAB, "logprob_dtype": "float32", **kwargs}
    config_keys = {"padding_free", "max_length"}
    args = _config(tmp_path, **{k: v for k, v in options.items() if k in config_keys})
    build_teacher_cache(_model(tiny_path, quantized=False), data, tiny_tokenizer(), args, path=tmp_path / name,
                        **{k: v for k, v in options.items() if k not in config_keys})
    return tmp_path / name


def _heads(n=37, hidden=16, vocab=50, sharpness=1.0, seed=0):
    torch.manual_seed(seed)
    s_head, t_head = torch.nn.Linear(hidden, vocab), torch.nn.Linear(hidden, vocab)
    with torch.no_grad():
        t_head.weight.mul_(sharpness)
    return s_head, t_head, torch.randn(n, hidden, requires_grad=True), torch.randint(0, vocab, (n,))


# ------------------------------------------------------------------ the loss
def test_full_vocabulary_cache_is_the_full_kl():
    s_head, t_head, h, targets = _heads()
    with torch.no_grad():
        cache = teacher_topk(t_head(h), targets, top_k=50)
    assert torch.isneginf(cache[2]).all()  # nothing left outside the top k
    got = cached_distillation_loss(h, s_head, *cache, targets, chunk_size=8)
    got.loss.backward()
    grad, h.grad = h.grad.clone(), None
    want = chunked_distillation_loss(h, s_head, h.detach(), t_head, targets, chunk_size=8)
    want.loss.backward()
    assert torch.allclose(got.divergence, want.divergence, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad, h.grad, rtol=1e-4, atol=1e-7)
    for name in ("student_nll", "teacher_nll", "top1_agreement", "kl"):
        assert torch.allclose(getattr(got, name), getattr(want, name), rtol=1e-5), name


@pytest.mark.parametrize("top_k, tolerance", [(8, 0.1), (20, 0.03)])
def test_small_k_is_a_close_lower_bound(top_k, tolerance):
    s_head, t_head, h, targets = _heads(sharpness=4.0)  # a peaked teacher, as trained LMs are
    with torch.no_grad():
        cache = teacher_topk(t_head(h), targets, top_k=top_k)
        full = token_divergence(s_head(h), t_head(h)).sum()
    approx = cached_distillation_loss(h, s_head, *cache, targets).divergence
    assert approx <= full + 1e-5
    assert (full - approx) / full < tolerance


def test_no_loss_tokens_and_misaligned_entries():
    s_head, t_head, h, targets = _heads(n=0)
    cache = teacher_topk(t_head(h), targets, top_k=4)
    sums = cached_distillation_loss(h, s_head, *cache, targets)
    assert sums.divergence.item() == 0.0 and sums.tokens == 0
    s_head, t_head, h, targets = _heads(n=5)
    cache = teacher_topk(t_head(h), targets, top_k=4)
    with pytest.raises(ValueError, match="4 entries for 5 loss tokens"):
        cached_distillation_loss(h, s_head, *(c[:4] for c in cache), targets)


def test_the_old_import_of_the_loss_warns_and_gives_the_same_function():
    with pytest.warns(DeprecationWarning, match="moved to hf_qad.trainer.losses.cached_distillation_loss"):
        from hf_qad.trainer.teacher_cache import cached_distillation_loss as old
    assert old is cached_distillation_loss


# ------------------------------------------------------------------ the trainer
def test_full_vocabulary_cache_gives_the_teacher_loss_on_shuffled_batches(tiny_path, tmp_path):
    """End to end: entries line up with the shuffled, collated batches (else the losses would differ)."""
    cache = _build(tiny_path, tmp_path)
    student = _model(tiny_path)
    with torch.no_grad():  # a student further from the teacher: a KL well above float32 noise
        student.model.norm.weight.mul_(4.0)
    cached = QADTrainer(student, args=_config(tmp_path, teacher_cache_path=str(cache)), train_dataset=DATA,
                        processing_class=tiny_tokenizer())
    assert cached.teacher_model is None and not cached.shared_teacher
    live = QADTrainer(student, teacher=_model(tiny_path, quantized=False), args=_config(tmp_path),
                      train_dataset=DATA, processing_class=tiny_tokenizer())
    batch = cached._prepare_inputs(next(iter(cached.get_train_dataloader())))
    assert (batch["labels"] == -100).any()  # prompts are masked out
    with torch.no_grad():
        got = cached.compute_loss(student, dict(batch))
        want = live.compute_loss(student, {k: v for k, v in batch.items() if not k.startswith("teacher_")})
    assert torch.allclose(got, want, rtol=1e-4), (got.item(), want.item())  # float32 noise of two teacher forwards


def test_padding_free_batches_line_up_with_the_cache(tiny_path, tmp_path):
    cache = _build(tiny_path, tmp_path, padding_free=True, max_length=None)
    trainer = QADTrainer(_model(tiny_path), args=_config(tmp_path, teacher_cache_path=str(cache), padding_free=True,
                                                         max_length=None),
                         train_dataset=DATA, processing_class=tiny_tokenizer())
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1  # four examples in one row
    # The teacher, run on each example of the row alone, gives the cached log-probs in the same order.
    teacher, want = _model(tiny_path, quantized=False), []
    starts = [*(batch["position_ids"][0] == 0).nonzero().flatten().tolist(), batch["input_ids"].shape[1]]
    for start, end in zip(starts, starts[1:]):
        ids, labels = batch["input_ids"][:, start:end], batch["labels"][0, start + 1:end]
        with torch.no_grad():
            logprobs = teacher(ids).logits[0, :-1].log_softmax(-1)
        want.append(logprobs[labels != -100].gather(-1, labels[labels != -100, None])[:, 0])
    assert torch.allclose(batch["teacher_target_logprob"], torch.cat(want), atol=1e-5)


def test_training_from_the_cache_loads_no_teacher(tiny_path, tmp_path, monkeypatch):
    cache = _build(tiny_path, tmp_path, top_k=8, logprob_dtype="float16")
    monkeypatch.setattr(QADTrainer, "_prepare_teacher", lambda *args: pytest.fail("a teacher was loaded"))
    trainer = QADTrainer(str(tiny_path), args=_config(tmp_path, teacher_cache_path=str(cache)), train_dataset=DATA,
                         processing_class=tiny_tokenizer())
    trainer.train()
    assert trainer.teacher_model is None
    logs = [entry for entry in trainer.state.log_history if "kl" in entry]
    assert len(logs) == 2 and all(entry["kl"] > 0 and entry["teacher_ce"] > 0 for entry in logs)


def test_a_cache_that_does_not_match_the_data_is_refused(tiny_path, tmp_path):
    cache = _build(tiny_path, tmp_path, top_k=4)

    def trainer(data=DATA, eval_dataset=None, **overrides):
        return QADTrainer(_model(tiny_path), args=_config(tmp_path, teacher_cache_path=str(cache), **overrides),
                          train_dataset=data, eval_dataset=eval_dataset, processing_class=tiny_tokenizer())

    with pytest.raises(FileNotFoundError, match="no hf_qad teacher cache"):
        QADTrainer(_model(tiny_path), args=_config(tmp_path, teacher_cache_path=str(tmp_path / "none")),
                   train_dataset=DATA, processing_class=tiny_tokenizer())
    with pytest.raises(ValueError, match="has 8 examples but the prepared training set has 4"):
        trainer(DATA.select(range(4)))
    edited = DATA.map(lambda example, i: {"completion": example["completion"] + "!" * (i == 5)}, with_indices=True)
    with pytest.raises(ValueError, match="at example 5"):
        trainer(edited)
    with pytest.raises(ValueError, match="at example"):
        trainer(max_length=12)  # truncation changes the rows
    with pytest.raises(ValueError, match="either a teacher or the cache"):
        QADTrainer(_model(tiny_path), teacher=str(tiny_path), args=_config(tmp_path, teacher_cache_path=str(cache)),
                   train_dataset=DATA, processing_class=tiny_tokenizer())
    with pytest.raises(ValueError, match="training set only"):
        trainer(eval_dataset=DATA)


def test_collator_checks_each_example(tiny_path, tmp_path):
    collator = TeacherCacheCollator(lambda examples: {"n": len(examples)}, top_k=2)
    example = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "teacher_topk_ids": [[1, 2], [3, 4]],
               "teacher_topk_logprobs": [[-1.0, -2.0], [-1.0, -2.0]], "teacher_tail_logprob": [-3.0, -3.0],
               "teacher_target_logprob": [-1.0, -2.0]}
    batch = collator([example, example])
    assert batch["teacher_topk_ids"].shape == (4, 2) and batch["teacher_tail_logprob"].shape == (4,)
    with pytest.raises(ValueError, match="2 teacher entries for 1 loss tokens"):
        collator([{**example, "labels": [-100, -100, 3]}])


@pytest.mark.parametrize("field, value", [("packing", True), ("divergence", "reverse_kl"), ("temperature", 2.0)])
def test_unsupported_options(tmp_path, field, value):
    with pytest.raises(ValueError, match="teacher_cache_path"):
        QADConfig(str(tmp_path), use_cpu=True, teacher_cache_path=str(tmp_path), max_length=32, **{field: value})


def _kl_rounding_bound(t_logits: torch.Tensor, s_logits: torch.Tensor) -> float:
    """A bound on the float32 rounding error of ``sum KL(teacher || student)`` over these ``[N, V]`` logits.

    The KL is ``sum p (log p - log q)``, the small difference of the cross-entropy and the entropy, so it
    carries their rounding, not its own: a float32 log-softmax value (shift by the row max, log of a
    pairwise sum of V exps, subtraction) is off by at most ``u (2 |log p_v| + 2 ln V + log2 V + 2)``
    (u = 2^-24), and the p-weighted sum over V and N adds ``log2(N V) u sum p |log p - log q|``. Summed,
    with the weights p_v adding up to 1 per token; computed in float64 from the logits.
    """
    u, (n, v) = 2.0**-24, t_logits.shape
    log_p, log_q = F.log_softmax(t_logits.double(), -1), F.log_softmax(s_logits.double(), -1)
    p = log_p.exp()
    magnitude = (p * (log_p.abs() + log_q.abs())).sum()  # the cross-entropy plus the entropy
    log_softmax_error = u * (2 * magnitude + 2 * n * (2 * math.log(v) + math.log2(v) + 2))
    return float(log_softmax_error + math.log2(n * v) * u * (p * (log_p - log_q).abs()).sum())


def test_gradient_approaches_the_full_kl_gradient_as_k_grows(tiny_path):
    """The tiny model's measurement (benchmarks/RESULTS.md, teacher cache): gradient cosine to the full KL's."""
    teacher, student = _model(tiny_path, quantized=False), _model(tiny_path)
    ids = torch.tensor([tiny_tokenizer()(t)["input_ids"][:24] for t in TEXTS[:4]])
    targets = ids[:, 1:].flatten()
    with torch.no_grad():
        t_logits = teacher(ids).logits[:, :-1].flatten(0, 1)
    params = [p for p in student.parameters() if p.requires_grad]

    def gradient(loss_of_hidden):
        hidden = student.model(ids).last_hidden_state[:, :-1].flatten(0, 1)
        loss = loss_of_hidden(hidden)
        return loss.detach(), torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    full, full_grad = gradient(lambda h: token_divergence(student.lm_head(h), t_logits).sum())
    with torch.no_grad():
        rounding = _kl_rounding_bound(t_logits, student(ids).logits[:, :-1].flatten(0, 1))
    cosines = []
    for k in (8, 32, VOCAB):
        cache = teacher_topk(t_logits, targets, top_k=k)
        approx, grad = gradient(lambda h: cached_distillation_loss(h, student.lm_head, *cache, targets).loss)
        # A lower bound of the full KL (equal at k = VOCAB), up to the rounding of each of the two computations.
        assert approx <= full + 2 * rounding
        cosines.append(F.cosine_similarity(grad, full_grad, dim=0).item())
    assert cosines[0] < cosines[1] < cosines[2] and cosines[2] == pytest.approx(1.0, abs=1e-4)
