"""Shared pytest fixtures: tiny offline models and tokenizers (see fixtures.py)."""
import os
import sys
from pathlib import Path

# Triton kernels must see TRITON_INTERPRET before they are decorated.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Tiny models run fastest on one intra-op thread; with two threads on a busy
# 2-core machine, oversubscription makes them 10-40x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

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


# ---- MemGen checkpoints (memgen_fixtures.py) ---------------------------------
import memgen_fixtures  # noqa: E402


@pytest.fixture(scope="session")
def memgen_reasoner_dir(tmp_path_factory, tokenizer):
    """Tiny qwen2 reasoner, hidden 64, that emits delimiters and EOS."""
    return memgen_fixtures.build_memgen_reasoner(tmp_path_factory.mktemp("memgen_reasoner"), tokenizer)


@pytest.fixture(scope="session")
def wide_weaver_dir(tmp_path_factory, tokenizer):
    """A separate tiny qwen2 with hidden 96, sharing the tokenizer: a weaver wider than the reasoner."""
    return fixtures.build_tiny_model(tmp_path_factory.mktemp("wide_weaver"), tokenizer, hidden_size=96, seed=1)


@pytest.fixture(scope="session")
def memgen_ckpt_dir(tmp_path_factory, tokenizer, memgen_reasoner_dir):
    """Reference-layout checkpoint, every role on memgen_reasoner_dir, trigger inactive."""
    return memgen_fixtures.build_memgen_checkpoint(tmp_path_factory.mktemp("memgen_ckpt"), tokenizer,
                                                   memgen_reasoner_dir)


@pytest.fixture(scope="session")
def memgen_active_ckpt_dir(tmp_path_factory, tokenizer, memgen_reasoner_dir):
    """As memgen_ckpt_dir with an active trigger that both invokes and skips."""
    return memgen_fixtures.build_memgen_checkpoint(tmp_path_factory.mktemp("memgen_active"), tokenizer,
                                                   memgen_reasoner_dir, trigger_active=True, seed=1)


@pytest.fixture(scope="session")
def memgen_wide_ckpt_dir(tmp_path_factory, tokenizer, memgen_reasoner_dir, wide_weaver_dir):
    """Weaver on wide_weaver_dir (hidden 96), reasoner and active trigger on memgen_reasoner_dir."""
    return memgen_fixtures.build_memgen_checkpoint(tmp_path_factory.mktemp("memgen_wide"), tokenizer,
                                                   memgen_reasoner_dir, weaver_dir=wide_weaver_dir,
                                                   trigger_active=True, seed=2)


@pytest.fixture
def torch_one_thread():
    """Tiny models run fastest (and immune to a busy machine's thread
    oversubscription) on one intra-op thread; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
