"""push_to_hub / save_pretrained(push_to_hub=True) upload the packed export with a model card.

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
    """A fake Hub: ``hub.remote_card`` is the repository's README.md, ``hub.uploads`` what was committed."""
    state = SimpleNamespace(remote_card=None, uploads=None)

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def load_card(cls, repo_id, **kwargs):
        if state.remote_card is None:
            raise EntryNotFoundError(f"{repo_id} has no README.md")
        return ModelCard(state.remote_card)

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


def _model(path, scheme="w4a4", **card):
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=NVFP4Config(scheme=scheme), dtype=torch.bfloat16
    )
    if scheme == "w4a4":
        hf_qad.calibrate(model, token_batches(1))
    attach_model_card(model, **card)
    return model


def _card(uploads):
    return ModelCard(uploads["README.md"].decode())


def test_push_to_hub_uploads_packed_export_and_card(bf16_path, hub):
    model = _model(bf16_path, base_model="HuggingFaceTB/SmolLM2-135M")
    model.push_to_hub(REPO, tags=["my-tag"])

    assert {"config.json", "generation_config.json", "model.safetensors", "README.md"} <= set(hub.uploads)
    quant_config = json.loads(hub.uploads["config.json"])["quantization_config"]
    assert quant_config["quant_method"] == "compressed-tensors"
    assert quant_config["format"] == "nvfp4-pack-quantized"
    tensors = load(hub.uploads["model.safetensors"])
    for name in hf_qad.quantizer.conversion.nvfp4_modules(model):
        assert tensors[f"{name}.weight_packed"].dtype == torch.uint8
        assert f"{name}.weight" not in tensors
    assert tensors["lm_head.weight"].dtype == torch.bfloat16

    card = _card(hub.uploads)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert card.data.base_model_relation == "quantized"
    assert {"nvfp4", "compressed-tensors", "hf_qad", "my-tag"} <= set(card.data.tags)
    text = card.text
    assert CARD_MARKER in text
    for expected in (
        "NVFP4 W4A4",
        "`nvfp4-pack-quantized`",
        "[HuggingFaceTB/SmolLM2-135M](https://huggingface.co/HuggingFaceTB/SmolLM2-135M)",
        "| scale_method | amax |",
        f"vllm serve {REPO}",
        f'LLM(model="{REPO}")',
        "Blackwell",
        "Marlin",
        f'LlamaForCausalLM.from_pretrained("{REPO}")',
        "compressed-tensors",
    ):
        assert expected in text, expected


def test_save_pretrained_with_push_to_hub_uploads_the_card(bf16_path, hub, tmp_path):
    model = _model(bf16_path, scheme="w4a16")
    model.save_pretrained(tmp_path / "tiny", push_to_hub=True, repo_id=REPO)

    text = _card(hub.uploads).text
    assert "NVFP4 W4A16" in text and "not quantized (BF16/FP16)" in text and f"vllm serve {REPO}" in text
    assert "model.safetensors" in hub.uploads
    # the local folder keeps the same card
    assert (tmp_path / "tiny" / "README.md").read_bytes() == hub.uploads["README.md"]


def test_a_card_the_user_wrote_on_the_hub_is_kept(bf16_path, hub):
    hub.remote_card = "---\nlicense: apache-2.0\n---\n\n# My own card\n"
    _model(bf16_path).push_to_hub(REPO)
    assert "My own card" in _card(hub.uploads).text
    assert CARD_MARKER not in _card(hub.uploads).text


def test_plain_save_writes_the_card_and_respects_the_users_readme(bf16_path, tmp_path):
    model = _model(bf16_path, scheme="w4a16", training={"teacher": "bf16 base", "steps": 100})
    model.save_pretrained(tmp_path)
    readme = tmp_path / "README.md"
    text = readme.read_text()
    assert CARD_MARKER in text and f"vllm serve {tmp_path}" in text
    assert "## Training" in text and "| steps | 100 |" in text
    # loaded from a local folder: no base_model metadata, only the folder's name
    assert ModelCard(text).data.base_model is None and f"`{bf16_path.name}` (a local checkpoint)" in text

    attach_model_card(model, training={"steps": 200})  # ours: rewritten on the next save
    model.save_pretrained(tmp_path)
    assert "| steps | 200 |" in readme.read_text()

    readme.write_text("# Notes by hand\n")  # the user's: kept
    model.save_pretrained(tmp_path)
    assert readme.read_text() == "# Notes by hand\n"


def test_master_weight_checkpoints_get_no_card(bf16_path, tmp_path):
    model = _model(bf16_path, scheme="w4a16")
    with hf_qad.master_weight_checkpoint(model):
        model.save_pretrained(tmp_path)
    assert not (tmp_path / "README.md").exists()


def test_hooks_belong_to_the_model_instance(bf16_path, tmp_path):
    model = _model(bf16_path, scheme="w4a16")
    other = AutoModelForCausalLM.from_pretrained(bf16_path)
    assert "save_pretrained" in vars(model) and "save_pretrained" not in vars(other)
    assert type(model).save_pretrained is PreTrainedModel.save_pretrained  # the class is untouched
    assert attach_model_card(model) is attach_model_card(model)  # attaching twice installs nothing new
    # a copy (e.g. a teacher or reference model) saves itself, not the original
    twin = copy.deepcopy(model)
    assert twin.save_pretrained.__self__ is twin and twin._upload_modified_files.__self__ is twin
    twin.save_pretrained(tmp_path)
    assert CARD_MARKER in (tmp_path / "README.md").read_text()


def test_only_hf_qad_models_get_a_card(bf16_path):
    with pytest.raises(ValueError, match="NVFP4Config"):
        attach_model_card(AutoModelForCausalLM.from_pretrained(bf16_path))


def test_table_cells_escape_pipes(bf16_path, tmp_path):
    model = _model(bf16_path, scheme="w4a16", training={"data": "a|b", "schedule": {"warmup": 10}})
    model.save_pretrained(tmp_path)
    lines = (tmp_path / "README.md").read_text().splitlines()
    assert "| data | a\\|b |" in lines
    assert '| schedule | `{"warmup": 10}` |' in lines
