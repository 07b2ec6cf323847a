"""Shared pytest fixtures: tiny offline models and tokenizers (see fixtures.py)."""
import os
import sys
from pathlib import Path

# Triton kernels must see TRITON_INTERPRET before they are decorated.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

import fixtures  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return fixtures.build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session", params=["qwen2", "qwen3", "llama"])
def tiny_model_dir(request, tmp_path_factory, tokenizer):
    """A tiny random model directory of each supported architecture."""
    return fixtures.build_tiny_model(tmp_path_factory.mktemp(request.param), tokenizer, arch=request.param)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory, tokenizer):
    return fixtures.build_tiny_model(tmp_path_factory.mktemp("qwen2"), tokenizer, arch="qwen2")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    return fixtures.build_tiny_model(tmp_path_factory.mktemp("llama"), tokenizer, arch="llama")
