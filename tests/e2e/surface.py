"""Checks of the whole OpenAI surface against a running app, shared by every way a request travels.

Each takes the app's base URL and the ids of the models that serve the
capability: a generating model, an embedding model (MiniLM) and a
cross-encoder. The same checks run under `llmserve run` (front door and
handoff), under `serve.run` (where the ingress takes Serve's port on its node,
serve_port.py) and with the models on another Ray node (the splice path).
"""

import json
import math

import openai
import requests

RELATED = ("A cat sits on the mat.", "A kitten is resting on a rug.")
UNRELATED = "Stock markets fell sharply on Tuesday."


def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(base_url, path, body):
    return requests.post(base_url + path, json=body, timeout=120)


def ok_json(response):
    assert response.status_code == 200, response.text
    return response.json()


def unsupported(response, endpoint):
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_endpoint" and endpoint in error["message"]


def check_responses_api(base_url, model):
    """`/v1/responses` through the openai SDK, whole and streamed: the same greedy text."""
    sdk = client(base_url)
    whole = sdk.responses.create(model=model, input="Say hello.", max_output_tokens=12, temperature=0)
    assert whole.status in ("completed", "incomplete") and whole.output_text
    events = list(sdk.responses.create(model=model, input="Say hello.", max_output_tokens=12, temperature=0, stream=True))
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    streamed = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert streamed == whole.output_text


def check_tokenize_round_trip(base_url, model, *, has_chat_template):
    text = "hello there tokenizer"
    tokens = ok_json(post(base_url, "/tokenize", {"model": model, "prompt": text, "add_special_tokens": False}))
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert ok_json(post(base_url, "/detokenize", {"model": model, "tokens": tokens["tokens"]}))["prompt"] == text
    if has_chat_template:
        chat = ok_json(post(base_url, "/tokenize", {"model": model, "messages": [{"role": "user", "content": text}]}))
        assert chat["count"] > tokens["count"]  # the chat template wraps the message


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def check_embedding_family(base_url, model):
    """Embeddings (SDK), score, rerank on every path vLLM serves them, pooling: one model's views of the same vectors."""
    vectors = [item.embedding for item in client(base_url).embeddings.create(model=model, input=[*RELATED, UNRELATED]).data]
    assert len(vectors) == 3 and len(vectors[0]) == 384
    related, unrelated = cosine(vectors[0], vectors[1]), cosine(vectors[0], vectors[2])
    assert related > 0.5 and unrelated < 0.3, (related, unrelated)

    for path in ("/score", "/v1/score"):
        scores = ok_json(post(base_url, path, {"model": model, "text_1": RELATED[0], "text_2": [RELATED[1], UNRELATED]}))["data"]
        assert math.isclose(scores[0]["score"], related, abs_tol=1e-3) and scores[0]["score"] > scores[1]["score"]
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        ranked = ok_json(post(base_url, path, {"model": model, "query": RELATED[0], "documents": [UNRELATED, RELATED[1]]}))["results"]
        assert [result["index"] for result in ranked] == [1, 0]

    pooled = ok_json(post(base_url, "/pooling", {"model": model, "input": RELATED[0]}))["data"][0]["data"]
    assert math.isclose(cosine(pooled, vectors[0]), 1.0, abs_tol=1e-4)

    # vLLM's binary embeddings: raw float32 bytes, described by a `metadata` header.
    raw = post(base_url, "/v1/embeddings", {"model": model, "input": RELATED[0], "encoding_format": "bytes", "embed_dtype": "float32"})
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/octet-stream"
    described = json.loads(raw.headers["metadata"])["data"][0]
    assert described["shape"] == [384] and described["end"] - described["start"] == len(raw.content) == 384 * 4
    import numpy as np

    assert math.isclose(cosine(np.frombuffer(raw.content, dtype=np.float32).tolist(), vectors[0]), 1.0, abs_tol=1e-4)


def check_cross_encoder(base_url, model):
    """A sequence classifier with one label serves classify, score and rerank, consistently."""
    classified = ok_json(post(base_url, "/classify", {"model": model, "input": [RELATED[0]]}))["data"][0]
    assert classified["num_classes"] == 1 and 0.0 <= classified["probs"][0] <= 1.0
    scores = ok_json(post(base_url, "/score", {"model": model, "text_1": RELATED[0], "text_2": [RELATED[1], UNRELATED]}))["data"]
    ranked = ok_json(post(base_url, "/rerank", {"model": model, "query": RELATED[0], "documents": [RELATED[1], UNRELATED]}))["results"]
    by_index = {result["index"]: result["relevance_score"] for result in ranked}
    assert all(math.isclose(by_index[index], item["score"], abs_tol=1e-4) for index, item in enumerate(scores))


def check_missing_capabilities_are_400s(base_url, chat_model, embed_model):
    """A model asked for what it cannot do answers 400 naming the endpoint: never 404 or 5xx."""
    unsupported(post(base_url, "/v1/embeddings", {"model": chat_model, "input": "x"}), "embeddings")
    unsupported(post(base_url, "/v1/responses", {"model": embed_model, "input": "x"}), "responses")
    unsupported(post(base_url, "/v1/chat/completions", {"model": embed_model, "messages": [{"role": "user", "content": "x"}]}), "chat")
    unsupported(post(base_url, "/classify", {"model": embed_model, "input": ["x"]}), "classify")


def wav(kind, seconds=1.0, rate=16000):
    """A mono 16 kHz WAV file's bytes: a 440 Hz tone or white noise."""
    import io

    import numpy as np
    import soundfile

    samples = int(seconds * rate)
    if kind == "tone":
        audio = 0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / rate)
    else:
        audio = 0.3 * np.random.default_rng(0).standard_normal(samples)
    buffer = io.BytesIO()
    soundfile.write(buffer, audio.astype(np.float32), rate, format="WAV")
    return buffer.getvalue()


def post_audio(base_url, path, fields, audio, name="clip.wav"):
    return requests.post(base_url + path, data=fields, files={"file": (name, audio, "audio/wav")}, timeout=120)


def check_audio(base_url, model, *, chat_model):
    """Transcriptions and translations: multipart uploads routed by their `model` form field."""
    sdk = client(base_url)
    short = {"max_completion_tokens": 8}
    tone = sdk.audio.transcriptions.create(model=model, file=("tone.wav", wav("tone")), language="en", temperature=0, extra_body=short)
    again = sdk.audio.transcriptions.create(model=model, file=("tone.wav", wav("tone")), language="en", temperature=0, extra_body=short)
    noise = sdk.audio.transcriptions.create(model=model, file=("noise.wav", wav("noise")), language="en", temperature=0, extra_body=short)
    assert tone.text and tone.text == again.text  # greedy: the same audio, the same text
    assert noise.text != tone.text  # the audio reached the model
    translated = sdk.audio.translations.create(model=model, file=("tone.wav", wav("tone")), temperature=0, extra_body=short)
    assert isinstance(translated.text, str) and translated.text

    fields = {"model": model, "language": "en", "temperature": "0", "max_completion_tokens": "8"}
    streamed = post_audio(base_url, "/v1/audio/transcriptions", {**fields, "stream": "true"}, wav("tone"))
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(event)["choices"][0]["delta"].get("content") or "" for event in events[:-1]) == tone.text
    verbose = ok_json(post_audio(base_url, "/v1/audio/transcriptions", {**fields, "response_format": "verbose_json"}, wav("tone")))
    assert verbose["language"] == "en" and verbose["duration"] == 1.0

    unknown = post_audio(base_url, "/v1/audio/transcriptions", {**fields, "model": "nope"}, wav("tone"))
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    unsupported(post_audio(base_url, "/v1/audio/transcriptions", {**fields, "model": chat_model}, wav("tone")), "transcriptions")
    not_audio = post_audio(base_url, "/v1/audio/transcriptions", fields, b"this is not audio")
    assert not_audio.status_code == 400 and not_audio.json()["error"]["type"] == "invalid_request_error"
    as_json = post(base_url, "/v1/audio/transcriptions", {**fields, "file": "clip.wav"})
    assert as_json.status_code == 400 and as_json.json()["error"]["param"] == "file"
    unsupported(post(base_url, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "x"}]}), "chat")


def check_batch_and_render(base_url, model):
    """Several conversations in one call, and prompts rendered to the token ids the engine would run."""
    question = [{"role": "user", "content": "Tell me a story"}]
    other = [{"role": "user", "content": "Count to ten"}]
    batch = ok_json(post(base_url, "/v1/chat/completions/batch", {"model": model, "messages": [question, other], "max_tokens": 4, "temperature": 0}))
    assert [choice["index"] for choice in batch["choices"]] == [0, 1]
    alone = ok_json(post(base_url, "/v1/chat/completions", {"model": model, "messages": question, "max_tokens": 4, "temperature": 0}))
    assert batch["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]

    chat_ids = ok_json(post(base_url, "/tokenize", {"model": model, "messages": question}))["tokens"]
    rendered = ok_json(post(base_url, "/v1/chat/completions/render", {"model": model, "messages": question}))
    assert rendered["token_ids"] == chat_ids
    prompt_ids = ok_json(post(base_url, "/tokenize", {"model": model, "prompt": "Once upon a time"}))["tokens"]
    rendered = ok_json(post(base_url, "/v1/completions/render", {"model": model, "prompt": "Once upon a time"}))
    assert rendered[0]["token_ids"] == prompt_ids
    rendered = ok_json(post(base_url, "/v1/responses/render", {"model": model, "input": "Tell me a story"}))
    assert rendered["token_ids"] == chat_ids


def check_every_endpoint(base_url, *, chat_model, embed_model, cross_encoder, speech_model):
    check_responses_api(base_url, chat_model)
    check_batch_and_render(base_url, chat_model)
    check_tokenize_round_trip(base_url, chat_model, has_chat_template=True)
    check_tokenize_round_trip(base_url, embed_model, has_chat_template=False)
    check_embedding_family(base_url, embed_model)
    check_cross_encoder(base_url, cross_encoder)
    check_missing_capabilities_are_400s(base_url, chat_model, embed_model)
    check_audio(base_url, speech_model, chat_model=chat_model)


def check_sampling_options(base_url, model):
    """n, logprobs/top_logprobs, echo, logit_bias, seed and user reach the engine and shape the answer."""
    sdk = client(base_url)
    prompt = "Once upon a time"
    several = sdk.completions.create(model=model, prompt=prompt, max_tokens=6, n=3, temperature=1.0, seed=3)
    assert sorted(choice.index for choice in several.choices) == [0, 1, 2]
    same_seed = [sdk.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=1.0, seed=5).choices[0].text for _ in range(2)]
    assert same_seed[0] == same_seed[1]

    echoed = sdk.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2)
    assert echoed.choices[0].text.startswith(prompt)
    # Each position's two most likely tokens, and the chosen one when it is not among them
    # (fewer where tokens decode to the same text: they share a key).
    assert all(1 <= len(top) <= 3 for top in echoed.choices[0].logprobs.top_logprobs if top)

    greedy = sdk.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        user="tester-7",
        extra_body={"return_tokens_as_token_ids": True},
    )
    first = greedy.choices[0].logprobs.content[0]
    assert len(first.top_logprobs) == 2 and first.token.startswith("token_id:")
    # Forbid the greedy first token: the answer must change.
    token_id = int(first.token.removeprefix("token_id:"))
    biased = sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=4, temperature=0, logit_bias={str(token_id): -100}
    )
    assert biased.choices[0].logprobs is None and biased.choices[0].message.content != greedy.choices[0].message.content


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,12}$"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}


def streamed_chat(sdk, **request):
    """Content, reasoning (both field names) and tool calls put together from a stream's deltas."""
    content, reasoning, reasoning_content, calls = "", "", "", {}
    for chunk in sdk.chat.completions.create(stream=True, **request):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning", None) or ""
            reasoning_content += getattr(delta, "reasoning_content", None) or ""
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
                entry["name"] += (call.function and call.function.name) or ""
                entry["arguments"] += (call.function and call.function.arguments) or ""
    return content, reasoning, reasoning_content, list(calls.values())


def check_reasoning(base_url, model, *, reasoning, answer):
    """The parsed reasoning arrives as vLLM's `reasoning` and as `reasoning_content`, whole and streamed."""
    sdk = client(base_url)
    request = {"model": model, "messages": [{"role": "user", "content": "What is 6 times 7?"}], "max_tokens": 16, "temperature": 0}
    message = sdk.chat.completions.create(**request).choices[0].message
    assert message.content == answer
    assert message.reasoning == reasoning and message.reasoning_content == reasoning
    assert streamed_chat(sdk, **request)[:3] == (answer, reasoning, reasoning)
    no_thinking = sdk.chat.completions.create(**request, extra_body={"chat_template_kwargs": {"enable_thinking": False}}).choices[0].message
    assert no_thinking.content == answer and not getattr(no_thinking, "reasoning", None)


def check_tool_calls(base_url, model, *, expected_call):
    """tool_choice auto (the model's own call, exactly), required and named (grammar-enforced), whole and streamed."""
    sdk = client(base_url)
    request = {"model": model, "messages": [{"role": "user", "content": "Weather in Paris?"}], "temperature": 0}
    # Not strict: the arguments are the model's own, so the call is exactly the scripted one.
    loose_tool = {"type": "function", "function": {key: value for key, value in WEATHER_TOOL["function"].items() if key != "strict"}}
    auto = sdk.chat.completions.create(**request, max_tokens=16, tools=[loose_tool], tool_choice="auto").choices[0]
    assert auto.finish_reason == "tool_calls"
    [call] = auto.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (expected_call["name"], expected_call["arguments"])
    [streamed] = streamed_chat(sdk, **request, max_tokens=16, tools=[loose_tool], tool_choice="auto")[3]
    assert (streamed["name"], json.loads(streamed["arguments"])) == (expected_call["name"], expected_call["arguments"])

    # Forced calls are written by the grammar, a character a token on this model.
    named = {"type": "function", "function": {"name": "get_weather"}}
    for tool_choice in ("required", named):
        forced = sdk.chat.completions.create(**request, max_tokens=200, tools=[WEATHER_TOOL], tool_choice=tool_choice).choices[0]
        [forced_call] = forced.message.tool_calls
        assert forced_call.function.name == "get_weather"
        assert set(json.loads(forced_call.function.arguments)) == {"city"}
        [forced_stream] = streamed_chat(sdk, **request, max_tokens=200, tools=[WEATHER_TOOL], tool_choice=tool_choice)[3]
        assert forced_stream["name"] == "get_weather" and set(json.loads(forced_stream["arguments"])) == {"city"}


def check_langchain(base_url, chat_model, embed_model):
    """langchain-openai's chat model (invoke and stream) and embeddings against the endpoint."""
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    chat = ChatOpenAI(base_url=base_url + "/v1", api_key="unused", model=chat_model, temperature=0, max_tokens=24, max_retries=0)
    whole = chat.invoke("What is the capital of France?").content
    assert "Paris" in whole
    assert "".join(chunk.content for chunk in chat.stream("What is the capital of France?")) == whole
    # tiktoken's encodings come from the internet; the server counts tokens itself.
    embeddings = OpenAIEmbeddings(base_url=base_url + "/v1", api_key="unused", model=embed_model, check_embedding_ctx_length=False)
    documents = embeddings.embed_documents([RELATED[1], UNRELATED])
    query = embeddings.embed_query(RELATED[0])
    assert cosine(query, documents[0]) > cosine(query, documents[1]) + 0.3


def check_agents_sdk_tool_round_trip(base_url, model, *, expected_city, final_answer):
    """The OpenAI Agents SDK's default model (Responses API) runs one tool call and answers from its result."""
    from agents import Agent, Runner, function_tool, set_default_openai_client, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    set_default_openai_client(AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0), use_for_tracing=False)
    asked = []

    # Not strict: a strict schema has the grammar write the arguments, not the scripted model.
    @function_tool(strict_mode=False)
    def get_weather(city: str) -> str:
        """The weather in a city."""
        asked.append(city)
        return "sunny"

    agent = Agent(name="weather", instructions="Answer with the weather.", model=model, tools=[get_weather])
    result = Runner.run_sync(agent, "What is the weather in Paris?", max_turns=3)
    assert asked == [expected_city]
    assert result.final_output == final_answer, result.final_output


def check_seed_structured_output(base_url, model):
    """ray.serve.llm's documented JSON-mode clients, verbatim but for the model, a token bound,
    greedy decoding and a frequency penalty (sampled, or greedy without the penalty, a 135M
    model's JSON list can run on past any bound): a json_object stream, and a stream for
    a pydantic model's bare schema."""
    from typing import List, Literal

    from pydantic import BaseModel

    sdk = client(base_url)
    messages = [
        {"role": "system", "content": "You are a helpful assistant that outputs JSON."},
        {"role": "user", "content": "List three colors in JSON format"},
    ]

    def streamed(response_format):
        response = sdk.chat.completions.create(
            model=model, response_format=response_format, messages=messages, stream=True, max_tokens=300, temperature=0, frequency_penalty=1.0
        )
        return "".join(chunk.choices[0].delta.content or "" for chunk in response if chunk.choices)

    assert isinstance(json.loads(streamed({"type": "json_object"})), dict)

    class Color(BaseModel):
        colors: List[Literal["cyan", "magenta", "yellow"]]

    colors = Color.model_validate_json(streamed({"type": "json_schema", "json_schema": Color.model_json_schema()}))
    assert set(colors.colors) <= {"cyan", "magenta", "yellow"}


def check_structured_outputs(base_url, model):
    """The SDK's `parse` with a pydantic model, and vLLM's own `structured_outputs` (regex, choice)."""
    import re
    from typing import Literal

    from pydantic import BaseModel

    class Capital(BaseModel):
        country: Literal["France", "Germany", "Spain"]
        city: Literal["Paris", "Berlin", "Madrid"]

    sdk = client(base_url)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    parsed = sdk.chat.completions.parse(model=model, messages=question, response_format=Capital, max_tokens=60, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Capital)

    def constrained(structured_outputs, **extra):
        answer = sdk.chat.completions.create(
            model=model, messages=question, max_tokens=12, temperature=0, extra_body={"structured_outputs": structured_outputs}, **extra
        )
        return answer.choices[0].message.content

    assert re.fullmatch(r"[0-9]{3}", constrained({"regex": "[0-9]{3}"}))
    assert constrained({"choice": ["Paris", "Berlin", "Madrid"]}) in ("Paris", "Berlin", "Madrid")


def png_data_url(color):
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def check_vision(base_url, model, *, red_png_url):
    """image_url parts as data URLs and as an http URL vLLM fetches; one it cannot fetch is a 400.

    ``red_png_url`` serves the same red image as the data URL, so the greedy answers match.
    """
    sdk = client(base_url)

    def ask(url, **extra):
        content = [{"type": "text", "text": "What's in this image?"}, {"type": "image_url", "image_url": {"url": url}}]
        return sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0, **extra)

    red, blue = ask(png_data_url("red")), ask(png_data_url("blue"))
    text_only = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "What's in this image?"}], max_tokens=1)
    assert red.usage.prompt_tokens > text_only.usage.prompt_tokens  # the image's tokens are in the prompt
    assert red.choices[0].message.content != blue.choices[0].message.content
    # ray.serve.llm's vision client, streaming, with an http URL.
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in ask(red_png_url, stream=True) if chunk.choices)
    assert streamed == red.choices[0].message.content

    unreachable = [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/gone.png"}}]
    response = post(base_url, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": unreachable}]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "media_fetch_failed"
