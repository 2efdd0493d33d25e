"""Shared fixtures: the tiny models every real-engine test serves."""

from pathlib import Path

import pytest

from llmserve.tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parent.parent
# Small and eager: start-up in seconds, memory in megabytes, same settings everywhere.
TEST_ENGINE_KWARGS = {"max_model_len": 512, "kv_cache_memory_bytes": 64 * 1024**2, "enforce_eager": True}
# Whisper's decoder holds 448 positions.
SPEECH_ENGINE_KWARGS = {**TEST_ENGINE_KWARGS, "max_model_len": 448}


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-examples",
        type=int,
        default=20,
        help="schemathesis requests per API operation and mode (valid, invalid) in the fuzz test; `make fuzz` sets 70",
    )


@pytest.fixture(scope="session")
def tiny_model_paths() -> dict[str, str]:
    """Two tiny models with different weights, kept under the repo's models/ folder."""
    return {name: str(make_tiny_model(REPO / "models" / f"tiny-llama-seed{seed}", seed=seed)) for seed, name in enumerate(["tiny-a", "tiny-b"])}


@pytest.fixture(scope="session")
def example_model_paths() -> dict[str, str]:
    """The default example's real models (SmolLM2, MiniLM), a cross-encoder made from MiniLM
    and a tiny Whisper: the models every way of travel serves."""
    from llmserve.example_models import MINILM, SMOLLM2, make_all
    from llmserve.tiny_model import make_cross_encoder, make_tiny_whisper

    made = make_all(REPO / "models")
    cross_encoder = make_cross_encoder(made[MINILM], REPO / "models" / "tiny-cross-encoder")
    whisper = make_tiny_whisper(REPO / "models" / "tiny-whisper")
    return {"smollm2": str(made[SMOLLM2]), "minilm": str(made[MINILM]), "cross-encoder": str(cross_encoder), "whisper": str(whisper)}
