"""Every input a user can get wrong gives a correct result or a one-line error naming the problem and the fix.

The table of issue 13, one section per area; each row is a test. CLI errors are single lines with exit
status 2 (``hf_qad.cli.common.CommandError``).
"""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_qad
from hf_qad import NVFP4Config
from hf_qad.cli.common import CommandError
from hf_qad.cli.main import main
from tests.ct_oracle import assert_plain_transformers_logits
from tests.tiny_models import save_tiny_llama, save_tiny_llama_with_tokenizer, tiny_tokenizer, token_batches



# ============================================================================ loading, saving and exporting models
# (NVFP4Config options, tied embeddings, packed checkpoints with missing tensors, the advisory hf_qad entry,
#  hf-qad export's output folder, outlier weights)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"scheme": None}, "scheme must be"),
        ({"modules_to_not_convert": -1}, "list of module-name patterns"),
        ({"share_fused_global_scales": "no"}, "must be True or False"),
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
    assert_plain_transformers_logits(tmp_path / "packed", ids, expected, tmp_path)


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
    assert_plain_transformers_logits(edited, ids, expected, tmp_path)


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


# ============================================================================ training
# (non-finite gradients, resuming from a packed export, hf-qad train's flags, empty datasets, DDP without
#  gradient checkpointing)


# ============================================================================ command line and data
# (BOS, eval's teacher and tokenizer checks, long paragraphs in text files, CLI argument values)


# ============================================================================ compute dtype on CPUs
# (bf16 only where the CPU computes it natively; hf-qad train without an accelerator)
