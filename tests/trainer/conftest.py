import pytest

from tests.tiny_models import save_tiny_llama_with_tokenizer


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """A tiny BF16 Llama with a character tokenizer, saved once per session."""
    return save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("tiny_llama"))
