"""The vLLM engine's request and config shims, on vLLM's real classes (no engine started)."""

import asyncio
import json

import pytest

from llmserve.errors import ConfigError


def test_nested_engine_settings_become_vllms_config_classes_as_vllm_serve_parses_them():
    from llmserve.vllm_engine import split_engine_kwargs

    engine_args, _ = split_engine_kwargs(
        {"model": "m", "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}, "compilation_config": {"mode": 0}}
    )
    assert type(engine_args.structured_outputs_config).__name__ == "StructuredOutputsConfig"
    assert engine_args.structured_outputs_config.disable_any_whitespace is True
    assert type(engine_args.compilation_config).__name__ == "CompilationConfig"
    with pytest.raises(ConfigError, match="engine_kwargs.structured_outputs_config"):
        split_engine_kwargs({"model": "m", "structured_outputs_config": {"backend": "nope"}})


def test_a_bare_json_schema_in_response_format_is_given_a_name_as_ray_serve_llm_accepted_it():
    from llmserve.ray_llm_compat import with_named_json_schema

    schema = {"properties": {"colors": {"type": "array"}}, "required": ["colors"], "title": "Color", "type": "object"}
    body = {"model": "m", "response_format": {"type": "json_schema", "json_schema": schema}}
    assert with_named_json_schema(body)["response_format"]["json_schema"] == {"name": "Color", "schema": schema}
    openai_shape = {"model": "m", "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}}
    assert with_named_json_schema(openai_shape) is openai_shape


def test_reasoning_is_mirrored_as_reasoning_content_in_stream_deltas_only_where_present():
    from llmserve.ray_llm_compat import with_reasoning_content

    async def events():
        yield 'data: {"choices":[{"index":0,"delta":{"reasoning":"Let me think."}}]}\n\n'
        yield 'data: {"choices":[{"index":0,"delta":{"content":"42"}}]}\n\n'
        yield "data: [DONE]\n\n"

    async def collect():
        return [event async for event in with_reasoning_content(events())]

    first, second, done = asyncio.run(collect())
    assert json.loads(first[len("data: "):])["choices"][0]["delta"] == {"reasoning": "Let me think.", "reasoning_content": "Let me think."}
    assert second == 'data: {"choices":[{"index":0,"delta":{"content":"42"}}]}\n\n' and done == "data: [DONE]\n\n"


def test_reasoning_is_mirrored_in_whole_chat_answers():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse

    from llmserve.ray_llm_compat import with_reasoning_content

    answer = ChatCompletionResponse.model_validate(
        {
            "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "42", "reasoning": "Let me think."}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )
    message = json.loads(with_reasoning_content(answer).model_dump_json())["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == "Let me think."


def test_only_requests_that_name_media_urls_turn_fetch_failures_into_400s():
    from llmserve.vllm_engine import _names_media_urls

    image = {"type": "image_url", "image_url": {"url": "http://10.0.0.1/cat.png"}}
    assert _names_media_urls({"messages": [{"role": "user", "content": [image]}]})
    assert _names_media_urls({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]})
    assert not _names_media_urls({"messages": [{"role": "user", "content": "http://example.com is a site"}]})
    data_url = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert not _names_media_urls({"messages": [{"role": "user", "content": [data_url]}]})
    assert not _names_media_urls({"prompt": "hi"})
