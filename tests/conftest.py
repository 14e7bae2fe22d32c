import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers_*.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved as an HF folder (safetensors), shared by the session."""
    from helpers_shards import tiny_llama

    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(0).save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="session")
def tiny_fp(tiny_model_dir):
    from wrag_vllm.fingerprint import fingerprint_dir

    return fingerprint_dir(tiny_model_dir)
