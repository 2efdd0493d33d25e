"""A tiny Llama whose answers are scripted: exact reasoning and tool calls for tests.

Its attention and MLP outputs are zeroed, so each next token depends on the
current one only, and its output layer maps each token of a fixed chain to the
next. The chat template ends the prompt with a token that picks the chain:

- a plain chat: ``<think>Let me think step by step.</think>The answer is 42.``
  (with ``chat_template_kwargs: {enable_thinking: false}``: only the answer);
- a chat offering tools: ``<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>``;
- a chat whose last message is a tool's result: ``</think>The answer is 42.``
  (the closing tag tells a reasoning parser that what follows is the answer:
  vLLM's Responses API reads an answer without it as reasoning).

Each piece is one added token, so a reasoning parser (``qwen3``) and a tool
parser (``hermes``) see exactly what real models emit, and tests can assert
exact text.

Example::

    path = make_scripted_model("models/scripted")
    LLMConfig(model_loading_config={"model_id": "scripted", "model_source": str(path)},
              engine_kwargs={"reasoning_parser": "qwen3", "tool_call_parser": "hermes",
                             "enable_auto_tool_choice": True})
"""

from __future__ import annotations

import json
from pathlib import Path

from llmserve.tiny_model import TINY_HIDDEN, _save_tokenizer, already_made, mark_made, tiny_llama_config

REASONING = "Let me think step by step."
ANSWER = "The answer is 42."
TOOL_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOL_CALL_JSON = json.dumps(TOOL_CALL, separators=(",", ":"))

_SPECIAL = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|call|>", "<|answer|>"]
_ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>", REASONING, ANSWER, TOOL_CALL_JSON]
# Each token's successor; "</s>" ends the answer. A token has one successor, so
# the answer after a tool's result shares the plain chat's ending.
_CHAINS = [
    ["<|assistant|>", "<think>", REASONING, "</think>", ANSWER, "</s>"],
    ["<|call|>", "<tool_call>", TOOL_CALL_JSON, "</tool_call>", "</s>"],
    ["<|answer|>", "</think>"],
]
_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>{{ message['content'] if message['content'] is string else '' }}</s>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if messages[-1]['role'] == 'tool' -%}<|answer|>"
    "{%- elif tools -%}<|call|>"
    "{%- elif enable_thinking is defined and not enable_thinking -%}<|assistant|><think></think>"
    "{%- else -%}<|assistant|>"
    "{%- endif -%}"
    "{%- endif -%}"
)


def make_scripted_model(path: str | Path) -> Path:
    """Write the scripted model to ``path`` (skipped when it is already there)."""
    path = Path(path)
    fingerprint = {"scripted": True, "version": 4}
    if already_made(path, fingerprint):
        return path
    path.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(path, 1024, special_tokens=_SPECIAL, added_tokens=_ADDED, chat_template=_TEMPLATE)
    _save_weights(path)
    mark_made(path, fingerprint)
    return path


def _save_weights(path: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(path)
    token_id = tokenizer.convert_tokens_to_ids
    # The default init: small random embeddings for the tokens off the chains.
    config = tiny_llama_config(len(tokenizer), initializer_range=0.02)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    chain_tokens = sorted({token_id(token) for chain in _CHAINS for token in chain})
    embeddings, output = model.model.embed_tokens.weight, model.lm_head.weight
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream is then the current token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        # Dimension 0 is the same for every token: through it "</s>" gets a small logit
        # everywhere, so where no chain goes on (after text a grammar forced) the answer ends.
        embeddings[:, 0] = 1.0
        # The other dimensions of the chain's tokens are orthonormal: their logits are exact.
        basis, _ = torch.linalg.qr(torch.randn(TINY_HIDDEN - 1, len(chain_tokens)))
        for column, token in enumerate(chain_tokens):
            embeddings[token, 1:] = basis[:, column]
        output.zero_()
        output[token_id("</s>"), 0] = 0.3
        for chain in _CHAINS:
            for current, following in zip(chain, chain[1:]):
                output[token_id(following), 1:] += embeddings[token_id(current), 1:] * 2
    model.save_pretrained(path, safe_serialization=True)
