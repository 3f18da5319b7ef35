"""Student-versus-teacher metrics."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from hf_qad.evaluation import chunk_token_ids, compare_to_teacher


def _model(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


def test_metrics_match_a_direct_computation():
    student, teacher = _model(0), _model(1)
    ids = torch.randint(0, 64, (3, 12))
    result = compare_to_teacher(student, teacher, [ids[:2], ids[2:]])
    with torch.no_grad():
        s = F.log_softmax(student(ids).logits[:, :-1], -1)
        t = F.log_softmax(teacher(ids).logits[:, :-1], -1)
    target = ids[:, 1:]
    assert result.tokens == 3 * 11
    assert result.kl == pytest.approx(float((t.exp() * (t - s)).sum(-1).mean()), rel=1e-5)
    assert result.top1_agreement == pytest.approx(float((s.argmax(-1) == t.argmax(-1)).float().mean()))
    assert result.student_ppl == pytest.approx(math.exp(float(-s.gather(-1, target[..., None]).mean())), rel=1e-5)
    assert result.teacher_ppl == pytest.approx(math.exp(float(-t.gather(-1, target[..., None]).mean())), rel=1e-5)
    assert student.training and teacher.training  # modes restored


def test_identical_models_have_zero_kl():
    model = _model(0)
    result = compare_to_teacher(model, model, [torch.randint(0, 64, (2, 8))])
    assert result.kl == 0.0 and result.top1_agreement == 1.0


def test_chunking_and_errors():
    assert chunk_token_ids(list(range(10)), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert chunk_token_ids(list(range(10)), 2, max_tokens=4).shape == (2, 2)
    with pytest.raises(ValueError, match="at least"):
        chunk_token_ids([1, 2], 4)
    with pytest.raises(ValueError, match="no tokens"):
        compare_to_teacher(_model(0), _model(0), [])


def test_chunking_with_bos_starts_every_row_with_it():
    rows = chunk_token_ids(list(range(10, 20)), 4, bos_token_id=1)
    assert rows.tolist() == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18]]
    assert chunk_token_ids(list(range(10, 20)), 4, max_tokens=8, bos_token_id=1).shape == (2, 4)
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        chunk_token_ids(list(range(10)), 1, bos_token_id=1)
    with pytest.raises(ValueError, match="seq_len must be at least 1"):
        chunk_token_ids(list(range(10)), 0)
    with pytest.raises(ValueError, match="got 2"):
        chunk_token_ids([5, 6], 4, bos_token_id=1)


def test_token_rows_follow_the_tokenizer_on_bos():
    from hf_qad.evaluation import leading_bos_id, token_rows
    from tests.tiny_models import tiny_tokenizer

    texts = ["hello there", "general kenobi"]
    stream = [i for t in texts for i in tiny_tokenizer()(t, add_special_tokens=False)["input_ids"]]
    with_bos, without = tiny_tokenizer(add_bos=True), tiny_tokenizer()
    assert leading_bos_id(with_bos) == with_bos.bos_token_id == 1 and leading_bos_id(without) is None
    assert token_rows(with_bos, texts, 6).tolist() == [[1, *stream[i:i + 5]] for i in range(0, 25, 5)]
    assert token_rows(without, texts, 6, max_tokens=12).tolist() == [stream[:6], stream[6:12]]


def test_kl_by_position_averages_rows():
    student, teacher = _model(0), _model(1)
    ids = torch.randint(0, 64, (3, 10))
    result = compare_to_teacher(student, teacher, [ids])
    assert len(result.kl_by_position) == 9
    assert sum(result.kl_by_position) / 9 == pytest.approx(result.kl, rel=1e-5)


def test_multiple_choice_accuracy_picks_the_most_likely_choice():
    from hf_qad.evaluation import multiple_choice_accuracy
    from tests.tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = _model(0)
    model.resize_token_embeddings(len(tokenizer)) if len(tokenizer) > 64 else None
    rows = [{"question": "sky?", "choices": {"text": ["blue", "red", "x"], "label": ["A", "B", "C"]}, "answerKey": key}
            for key in "ABC"]
    accuracy = multiple_choice_accuracy(model, tokenizer, rows)
    assert accuracy == pytest.approx(1 / 3)  # one fixed prediction, one of three keys right
    with pytest.raises(ValueError, match="no rows"):
        multiple_choice_accuracy(model, tokenizer, [])


def test_batched_choice_scores_equal_one_sequence_at_a_time():
    import torch.nn.functional as F

    from hf_qad.evaluation import choice_log_likelihoods
    from tests.tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = _model(0)
    model.resize_token_embeddings(len(tokenizer))
    rows = [{"question": q, "choices": {"text": texts, "label": list("ABCD"[: len(texts)])}, "answerKey": "A"}
            for q, texts in [("sky?", ["blue", "a red one", "x"]), ("why is the sea", ["salt", "b", "c d e f", "g"]),
                             ("ok", ["yes", "no"])]]
    batched = choice_log_likelihoods(model, tokenizer, rows, batch_size=3)
    assert [len(s) for s in batched] == [3, 4, 2]
    for row, row_scores in zip(rows, batched):
        prompt = tokenizer(f"Question: {row['question']}\nAnswer:")["input_ids"]
        for choice, score in zip(row["choices"]["text"], row_scores):
            choice_ids = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + choice_ids])
            logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            alone = float(logp.gather(-1, ids[0, 1:, None])[-len(choice_ids):].sum())
            assert score == pytest.approx(alone, abs=1e-4)
    one_at_a_time = choice_log_likelihoods(model, tokenizer, rows, batch_size=1)
    assert sum(one_at_a_time, []) == pytest.approx(sum(batched, []), abs=1e-4)
    with pytest.raises(ValueError, match="batch_size"):
        choice_log_likelihoods(model, tokenizer, rows, batch_size=0)


def test_layer_quantization_errors():
    from hf_qad.evaluation import layer_quantization_errors
    from hf_qad.nvfp4.linear import NVFP4Linear

    model = torch.nn.Sequential(NVFP4Linear(32, 16, quantize_activations=False))
    errors = layer_quantization_errors(model)
    assert list(errors) == ["0"] and 0.05 < errors["0"] < 0.2


def test_packed_layer_errors_are_measured_against_the_reference():
    import copy

    from hf_qad.evaluation import layer_quantization_errors
    from hf_qad.nvfp4.linear import NVFP4Linear

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    student = torch.nn.Sequential(*[NVFP4Linear.from_linear(copy.deepcopy(m), quantize_activations=False)
                                    if isinstance(m, torch.nn.Linear) else m for m in teacher])
    fake = layer_quantization_errors(student)
    for layer in (student[0], student[2]):
        layer.pack()
    assert layer_quantization_errors(student) == {}  # no master weight and no reference: nothing to measure
    assert layer_quantization_errors(student, reference=teacher) == pytest.approx(fake, rel=1e-6)
    with pytest.raises(ValueError, match="no weight 2 of shape"):
        layer_quantization_errors(student, reference=teacher[:2])
    with pytest.raises(ValueError, match="no weight 0 of shape"):
        layer_quantization_errors(student, reference=torch.nn.Sequential(torch.nn.Linear(64, 16)))


@pytest.mark.parametrize("architecture", ["qwen3_moe", "mixtral"])
def test_moe_experts_errors_one_entry_per_projection_fake_and_packed(architecture, tmp_path):
    from transformers import AutoModelForCausalLM

    import hf_qad
    from hf_qad import NVFP4Config
    from hf_qad.evaluation import layer_quantization_errors
    from tests.tiny_models import save_tiny_model, tiny_config

    save_tiny_model(tmp_path / "teacher", architecture, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", quantization_config=NVFP4Config(scheme="w4a16"))
    fake = layer_quantization_errors(student)
    experts_name = "model.layers.0.mlp.experts"
    experts = student.get_submodule(experts_name)
    # one entry per projection, in model order: after the layer's attention, before the next layer
    names = list(fake)
    assert names.index(f"{experts_name}.gate_up_proj") + 1 == names.index(f"{experts_name}.down_proj")
    assert names.index("model.layers.0.self_attn.o_proj") < names.index(f"{experts_name}.gate_up_proj")
    assert names.index(f"{experts_name}.down_proj") < names.index("model.layers.1.self_attn.q_proj")
    for projection in ("gate_up_proj", "down_proj"):  # the error over all experts together
        weight = getattr(experts, projection).detach()
        with torch.no_grad():
            expected = (experts.fake_quantized_weight(projection) - weight).norm() / weight.norm()
        assert fake[f"{experts_name}.{projection}"] == pytest.approx(float(expected), rel=1e-6)
        assert 0.05 < fake[f"{experts_name}.{projection}"] < 0.2
    student.save_pretrained(tmp_path / "packed")
    packed = hf_qad.load_packed_model(tmp_path / "packed", dtype=torch.float32)
    assert layer_quantization_errors(packed) == {}  # no master weights and no reference
    assert layer_quantization_errors(packed, reference=teacher) == pytest.approx(fake, rel=1e-6)
    fewer_experts = {"qwen3_moe": {"num_experts": 2}, "mixtral": {"num_local_experts": 2}}[architecture]
    other = AutoModelForCausalLM.from_config(tiny_config(architecture, **fewer_experts))
    with pytest.raises(ValueError, match=rf"no weight {experts_name}\.gate_up_proj of shape \(4, "):
        layer_quantization_errors(packed, reference=other)
