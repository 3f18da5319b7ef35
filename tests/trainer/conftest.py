import pytest

from tests.tiny_models import save_tiny_llama_with_tokenizer, save_tiny_model


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """A tiny BF16 Llama with a character tokenizer, saved once per session."""
    return save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_moe_path(tmp_path_factory):
    """A tiny BF16 Qwen3-MoE (fused experts, top-2 of 4) with the character tokenizer, saved once per session."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_moe"), "qwen3_moe")
