import pytest

from tasks.demo_model import make_demo_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A small random-init llama in HF layout, with a locally trained tokenizer."""
    return make_demo_model(tmp_path_factory.mktemp("models") / "tiny-llama")
