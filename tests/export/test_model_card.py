"""Model cards of packed exports (write_model_card), and push_to_hub of the packed export.

No network: the Hub calls transformers makes (create_repo, the remote card lookup,
create_commit) are replaced by fakes that record what would be uploaded.
"""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import EntryNotFoundError
from safetensors.torch import load
from transformers import AutoModelForCausalLM, PreTrainedModel

import hf_qad
from hf_qad import NVFP4Config, attach_model_card
from hf_qad.export.model_card import CARD_MARKER
from tests.tiny_models import save_tiny_llama, token_batches

REPO = "me/tiny-llama-nvfp4"


@pytest.fixture(scope="module")
def bf16_path(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("bf16"))


@pytest.fixture
def hub(monkeypatch):
    """A fake Hub with an empty repository; ``hub.uploads`` is what was committed."""
    state = SimpleNamespace(uploads=None)

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def load_card(cls, repo_id, **kwargs):
        raise EntryNotFoundError(f"{repo_id} has no README.md")

    def create_commit(self, repo_id, operations, **kwargs):
        # read now: push_to_hub uploads from a temporary folder that is deleted afterwards
        state.uploads = {}
        for op in operations:
            with open(op.path_or_fileobj, "rb") as f:
                state.uploads[op.path_in_repo] = f.read()
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(ModelCard, "load", classmethod(load_card))
    return state


def _model(path, scheme="w4a4"):
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=NVFP4Config(scheme=scheme), dtype=torch.bfloat16
    )
    if scheme == "w4a4":
        hf_qad.calibrate(model, token_batches(1))
    return model


def _card(uploads):
    return ModelCard(uploads["README.md"].decode())


def test_push_to_hub_uploads_the_packed_export_tagged(bf16_path, hub):
    model = _model(bf16_path)
    model.push_to_hub(REPO, tags=["my-tag"])

    assert {"config.json", "generation_config.json", "model.safetensors", "README.md"} <= set(hub.uploads)
    quant_config = json.loads(hub.uploads["config.json"])["quantization_config"]
    assert quant_config["quant_method"] == "compressed-tensors"
    assert quant_config["format"] == "nvfp4-pack-quantized"
    tensors = load(hub.uploads["model.safetensors"])
    for name in hf_qad.nvfp4.conversion.nvfp4_modules(model):
        assert tensors[f"{name}.weight_packed"].dtype == torch.uint8
        assert f"{name}.weight" not in tensors
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    # transformers' own card, with the tags the quantizer gave the model
    assert {"nvfp4", "hf_qad", "my-tag"} <= set(_card(hub.uploads).data.tags)


def test_written_card_describes_the_export(bf16_path, hub, tmp_path):
    model = _model(bf16_path)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "README.md").exists()  # save_pretrained itself writes no card
    assert hf_qad.write_model_card(model, tmp_path, repo_id=REPO, base_model="HuggingFaceTB/SmolLM2-135M")
    card = ModelCard((tmp_path / "README.md").read_text())
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert card.data.base_model_relation == "quantized"
    assert {"nvfp4", "compressed-tensors", "hf_qad"} <= set(card.data.tags)
    text = card.text
    assert CARD_MARKER in text
    for expected in (
        "NVFP4 W4A4",
        "`nvfp4-pack-quantized`",
        "[HuggingFaceTB/SmolLM2-135M](https://huggingface.co/HuggingFaceTB/SmolLM2-135M)",
        "| scale_method | amax |",
        "`lm_head`",
        f"vllm serve {REPO}",
        f'LLM(model="{REPO}")',
        "Blackwell",
        "Marlin",
        f'LlamaForCausalLM.from_pretrained("{REPO}")',
        "compressed-tensors",
    ):
        assert expected in text, expected


def test_w4a16_card(bf16_path, tmp_path):
    model = _model(bf16_path, scheme="w4a16")
    hf_qad.write_model_card(model, tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "NVFP4 W4A16" in text and "not quantized (BF16/FP16)" in text and f"vllm serve {tmp_path}" in text


def test_card_rewrites_its_own_and_keeps_the_users_readme(bf16_path, tmp_path):
    model = _model(bf16_path, scheme="w4a16")
    assert hf_qad.write_model_card(model, tmp_path, training={"teacher": "bf16 base", "steps": 100})
    readme = tmp_path / "README.md"
    text = readme.read_text()
    assert CARD_MARKER in text and "## Training" in text and "| steps | 100 |" in text
    # loaded from a local folder: no base_model metadata, only the folder's name
    assert ModelCard(text).data.base_model is None and f"`{bf16_path.name}` (a local checkpoint)" in text

    assert hf_qad.write_model_card(model, tmp_path, training={"steps": 200})  # ours: rewritten
    assert "| steps | 200 |" in readme.read_text()

    readme.write_text("# Notes by hand\n")  # the user's: kept
    assert not hf_qad.write_model_card(model, tmp_path)
    assert readme.read_text() == "# Notes by hand\n"


def test_saving_patches_nothing(bf16_path, tmp_path):
    model = _model(bf16_path, scheme="w4a16")
    model.save_pretrained(tmp_path)
    assert "save_pretrained" not in vars(model) and "_upload_modified_files" not in vars(model)
    assert type(model).save_pretrained is PreTrainedModel.save_pretrained
    twin = copy.deepcopy(model)  # a copy (e.g. a reference model) saves the same export
    twin.save_pretrained(tmp_path / "twin")
    assert (tmp_path / "twin" / "model.safetensors").read_bytes() == (tmp_path / "model.safetensors").read_bytes()


def test_attach_model_card_is_deprecated_and_feeds_the_card(bf16_path, tmp_path):
    model = _model(bf16_path, scheme="w4a16")
    with pytest.warns(DeprecationWarning, match="write_model_card"):
        attach_model_card(model, base_model="HuggingFaceTB/SmolLM2-135M", training={"steps": 7})
    hf_qad.write_model_card(model, tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "| steps | 7 |" in text and ModelCard(text).data.base_model == "HuggingFaceTB/SmolLM2-135M"


def test_only_hf_qad_models_get_a_card(bf16_path, tmp_path):
    with pytest.raises(ValueError, match="NVFP4Config"):
        hf_qad.write_model_card(AutoModelForCausalLM.from_pretrained(bf16_path), tmp_path)


def test_table_cells_escape_pipes(bf16_path, tmp_path):
    model = _model(bf16_path, scheme="w4a16")
    hf_qad.write_model_card(model, tmp_path, training={"data": "a|b", "schedule": {"warmup": 10}})
    lines = (tmp_path / "README.md").read_text().splitlines()
    assert "| data | a\\|b |" in lines
    assert '| schedule | `{"warmup": 10}` |' in lines
