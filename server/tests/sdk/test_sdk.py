"""The official `openai` and `anthropic` Python SDKs, unmodified, against a running `dsv4 serve`.

`ci/sdk-tests.sh` starts `dsv4 serve --model builtin:tiny --api-key test-key` and runs this file
with pytest. By hand, against any running server:

    DSV4_BASE_URL=http://127.0.0.1:8000 DSV4_API_KEY=test-key DSV4_BIN=target/debug/dsv4 \\
        DSV4_MODEL=builtin:tiny pytest server/tests/sdk/test_sdk.py

`DSV4_MODEL` is what the server was started with (`dsv4 render --model` reads the same
tokenizer); the served model name is read from `/v1/models`.

The built-in model has random weights, so its text is gibberish: the tests check what the SDKs
parse (types, shapes, event order), token counts against `/tokenize` and `dsv4 render --ids`,
that a streamed greedy reply equals the whole one, and that histories with tool calls, tool
results and thinking are accepted and counted as their OpenAI-shaped twins.
"""

import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.request

import anthropic
import openai
import pytest


def _env(name):
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(
            f"{name} is not set: these tests need a running `dsv4 serve` "
            "(ci/sdk-tests.sh starts one and sets DSV4_BASE_URL, DSV4_API_KEY, DSV4_BIN, DSV4_MODEL)"
        )
    return value


BASE_URL = _env("DSV4_BASE_URL").rstrip("/")
API_KEY = _env("DSV4_API_KEY")
DSV4_BIN = _env("DSV4_BIN")
MODEL_SPEC = _env("DSV4_MODEL")
TIMEOUT = 120

oa = openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key=API_KEY, timeout=TIMEOUT, max_retries=0)
an = anthropic.Anthropic(base_url=BASE_URL, api_key=API_KEY, timeout=TIMEOUT, max_retries=0)

MAX_TOKENS = 24

WEATHER_OPENAI = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}
WEATHER_ANTHROPIC = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": WEATHER_OPENAI["function"]["parameters"],
}

OFF = {"type": "disabled"}
ON = {"type": "enabled"}


def post_json(path, body):
    """POST to the server with the API key; returns the decoded JSON (raises on non-200)."""
    req = urllib.request.Request(
        BASE_URL + path,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"POST {path} {json.dumps(body)[:400]} -> {e.code}: {e.read()[:800]!r}") from None


def tokenize(messages, tools=None, thinking=None, **extra):
    body = {"model": served_model(), "messages": messages, **extra}
    if tools is not None:
        body["tools"] = tools
    if thinking is not None:
        body["thinking"] = thinking
    out = post_json("/tokenize", body)
    assert out["count"] == len(out["tokens"]), out
    return out


def render_ids(messages, tools=None, thinking=False, effort=None):
    """`dsv4 render --ids` for the same conversation."""
    with tempfile.TemporaryDirectory() as d:
        mpath = os.path.join(d, "messages.json")
        with open(mpath, "w") as f:
            json.dump(messages, f)
        cmd = [DSV4_BIN, "render", "--model", MODEL_SPEC, "--messages", mpath, "--ids"]
        if tools is not None:
            tpath = os.path.join(d, "tools.json")
            with open(tpath, "w") as f:
                json.dump(tools, f)
            cmd += ["--tools", tpath]
        cmd += ["--thinking"] if thinking else ["--no-thinking"]
        if effort:
            cmd += ["--reasoning-effort", effort]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
        assert out.returncode == 0, f"{cmd}: {out.stderr}"
        return [int(x) for x in out.stdout.strip().split(",") if x]


_served = []


def served_model():
    if not _served:
        models = oa.models.list().data
        assert len(models) == 1, models
        _served.append(models[0].id)
    return _served[0]


def reasoning_of(obj):
    """`reasoning_content` from an SDK message or delta (an extra field the SDK keeps raw)."""
    return (obj.model_extra or {}).get("reasoning_content")


# ---------------------------------------------------------------------------------------------
# OpenAI


def test_models_list():
    models = oa.models.list()
    assert [m.id for m in models.data] == [served_model()]
    m = models.data[0]
    assert m.object == "model" and isinstance(m.created, int) and isinstance(m.owned_by, str)


def test_models_retrieve():
    m = oa.models.retrieve(served_model())
    assert m.id == served_model() and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("no-such-model")


def chat(messages, stream=False, **kw):
    return oa.chat.completions.create(
        model=served_model(), messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=stream, **kw
    )


def check_completion(c, thinking):
    assert c.object == "chat.completion" and c.id and c.model == served_model()
    assert len(c.choices) == 1
    choice = c.choices[0]
    assert choice.index == 0 and choice.finish_reason in ("stop", "length", "tool_calls"), choice
    msg = choice.message
    assert msg.role == "assistant"
    assert msg.content is None or isinstance(msg.content, str)
    reasoning = reasoning_of(msg)
    if thinking:
        assert isinstance(reasoning, str), msg
    else:
        assert not reasoning, msg
    u = c.usage
    assert 1 <= u.completion_tokens <= MAX_TOKENS and u.total_tokens == u.prompt_tokens + u.completion_tokens
    if choice.finish_reason == "length":
        assert u.completion_tokens == MAX_TOKENS
    for tc in msg.tool_calls or []:
        assert tc.type == "function" and tc.id and tc.function.name == "get_weather"
        assert isinstance(json.loads(tc.function.arguments), dict)
    return msg


def collect_stream(stream):
    """Joins a chat stream: (content, reasoning, tool calls by index, finish_reason, usage, ids)."""
    content, reasoning, calls, finish, usage, ids = "", "", {}, None, None, set()
    n_role = 0
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk" and chunk.model == served_model()
        ids.add(chunk.id)
        if chunk.usage is not None:
            assert chunk.choices == [], chunk
            usage = chunk.usage
            continue
        assert usage is None, "a chunk after the usage chunk"
        assert len(chunk.choices) == 1
        ch = chunk.choices[0]
        assert finish is None, "a chunk after finish_reason"
        d = ch.delta
        if d.role is not None:
            assert d.role == "assistant"
            n_role += 1
        content += d.content or ""
        reasoning += reasoning_of(d) or ""
        for tc in d.tool_calls or []:
            c = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                c["id"] = tc.id
            if tc.function and tc.function.name:
                c["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                c["arguments"] += tc.function.arguments
        if ch.finish_reason is not None:
            finish = ch.finish_reason
    assert n_role == 1, f"role sent {n_role} times"
    assert len(ids) == 1, ids
    assert finish in ("stop", "length", "tool_calls")
    return content, reasoning, calls, finish, usage


@pytest.mark.parametrize(
    "label,kw",
    [
        ("chat mode", {"extra_body": {"thinking": OFF}}),
        ("thinking", {"extra_body": {"thinking": ON}}),
        ("reasoning_effort", {"reasoning_effort": "high"}),
        ("tools", {"extra_body": {"thinking": OFF}, "tools": [WEATHER_OPENAI]}),
        ("tools, thinking", {"reasoning_effort": "max", "tools": [WEATHER_OPENAI], "tool_choice": "auto"}),
    ],
)
def test_chat_whole_and_streamed_agree(label, kw):
    thinking = label != "chat mode" and label != "tools"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say hi ({label})."}]
    whole = chat(messages, **kw)
    msg = check_completion(whole, thinking)

    # The prompt counted in usage is the one /tokenize renders for the same request.
    tk = {"tools": kw.get("tools")}
    body_thinking = kw.get("extra_body", {}).get("thinking")
    extra = {"reasoning_effort": kw["reasoning_effort"]} if "reasoning_effort" in kw else {}
    assert whole.usage.prompt_tokens == tokenize(messages, thinking=body_thinking, **tk, **extra)["count"]

    stream = chat(messages, stream=True, stream_options={"include_usage": True}, **kw)
    content, reasoning, calls, finish, usage = collect_stream(stream)
    # Greedy: the stream carries exactly the whole reply.
    assert content == (msg.content or ""), (content, msg.content)
    assert reasoning == (reasoning_of(msg) or "")
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    want_calls = [(tc.function.name, json.loads(tc.function.arguments)) for tc in msg.tool_calls or []]
    got_calls = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]
    assert got_calls == want_calls


def test_a_client_that_leaves_mid_stream_does_not_disturb_the_next():
    # A streaming client that closes its connection after two chunks: its request is cancelled
    # (on a split server, on every rank alike), and the same greedy request afterwards gets the
    # reply it got before.
    messages = [{"role": "user", "content": "Tell me a long story."}]

    def ask(stream, max_tokens):
        return oa.chat.completions.create(
            model=served_model(),
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            stream=stream,
            extra_body={"thinking": OFF},
        )

    before = ask(False, 48)
    stream = ask(True, 400)
    for i, _ in enumerate(stream):
        if i == 1:
            break
    stream.close()
    after = ask(False, 48)
    assert after.choices[0].message.content == before.choices[0].message.content
    assert after.choices[0].finish_reason == before.choices[0].finish_reason


def test_chat_tools_are_in_the_prompt():
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    plain = chat(messages, extra_body={"thinking": OFF})
    tools = chat(messages, extra_body={"thinking": OFF}, tools=[WEATHER_OPENAI])
    assert tools.usage.prompt_tokens > plain.usage.prompt_tokens
    ids = tokenize(messages, tools=[WEATHER_OPENAI], thinking=OFF)
    assert ids["count"] == tools.usage.prompt_tokens


TOOL_HISTORY = [
    {"role": "system", "content": "You can look up the weather."},
    {"role": "user", "content": "What's the weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_0001",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_0001", "content": "sunny, 21 C"},
]


def test_chat_tool_call_history_round_trip():
    # A tool call as the SDK returns it (typed objects), dumped back into the history.
    from openai.types.chat import ChatCompletionMessage

    sdk_msg = ChatCompletionMessage.model_validate(
        {"role": "assistant", "content": None, "tool_calls": TOOL_HISTORY[2]["tool_calls"]}
    )
    history = TOOL_HISTORY[:2] + [sdk_msg.model_dump(exclude_none=True)] + TOOL_HISTORY[3:]
    for thinking in (OFF, ON):
        whole = chat(history, tools=[WEATHER_OPENAI], extra_body={"thinking": thinking})
        check_completion(whole, thinking is ON)
        counted = tokenize(history, tools=[WEATHER_OPENAI], thinking=thinking)
        assert whole.usage.prompt_tokens == counted["count"]
        # The history's tool call and result are in the prompt.
        text = post_json("/detokenize", {"tokens": counted["tokens"]})["prompt"]
        assert "get_weather" in text and "Paris" in text and "sunny, 21 C" in text, text
        content, _, _, finish, usage = collect_stream(
            chat(history, stream=True, stream_options={"include_usage": True}, tools=[WEATHER_OPENAI],
                 extra_body={"thinking": thinking})
        )
        assert content == (whole.choices[0].message.content or "") and finish == whole.choices[0].finish_reason
        assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_reasoning_history_round_trip():
    """A thinking reply fed back as history (its reasoning_content kept raw in model_extra)."""
    messages = [{"role": "user", "content": "Think, then answer."}]
    first = chat(messages, extra_body={"thinking": ON})
    msg = first.choices[0].message
    back = msg.model_dump(exclude_none=True)
    assert back.get("reasoning_content") == reasoning_of(msg)
    history = messages + [back, {"role": "user", "content": "And again."}]
    second = chat(history, extra_body={"thinking": ON})
    check_completion(second, True)
    assert second.usage.prompt_tokens == tokenize(history, thinking=ON)["count"]


def test_tokenize_equals_render():
    """`/tokenize` with `messages` gives exactly the ids `dsv4 render --ids` prints."""
    cases = [
        ([{"role": "user", "content": "Hello"}], None, False, None),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], None, True, None),
        (TOOL_HISTORY, [WEATHER_OPENAI], False, None),
        (TOOL_HISTORY, [WEATHER_OPENAI], True, None),
        ([{"role": "user", "content": "Hard question"}], None, True, "max"),
    ]
    for messages, tools, thinking, effort in cases:
        extra = {"reasoning_effort": effort} if effort else {}
        got = tokenize(messages, tools=tools, thinking=ON if thinking else OFF, **extra)["tokens"]
        want = render_ids(messages, tools=tools, thinking=thinking, effort=effort)
        assert got == want, (messages, tools, thinking, effort)


def test_openai_errors_are_sdk_exceptions():
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{BASE_URL}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model=served_model(), messages=[], max_tokens=1)


# ---------------------------------------------------------------------------------------------
# Anthropic

GREEDY = {"temperature": 0}


def message(messages, **kw):
    return an.messages.create(
        model=served_model(), max_tokens=MAX_TOKENS, messages=messages, extra_body=GREEDY, **kw
    )


def check_message(m, thinking):
    assert m.type == "message" and m.role == "assistant" and m.id and m.model == served_model()
    assert m.stop_reason in ("end_turn", "max_tokens", "stop_sequence", "tool_use"), m
    assert 1 <= m.usage.output_tokens <= MAX_TOKENS and m.usage.input_tokens >= 1
    if m.stop_reason == "max_tokens":
        assert m.usage.output_tokens == MAX_TOKENS
    kinds = [b.type for b in m.content]
    assert set(kinds) <= {"thinking", "text", "tool_use"}, kinds
    if thinking:
        assert kinds and kinds[0] == "thinking", kinds
    else:
        assert "thinking" not in kinds, kinds
    for b in m.content:
        if b.type == "thinking":
            assert isinstance(b.thinking, str) and isinstance(b.signature, str) and b.signature
        elif b.type == "text":
            assert isinstance(b.text, str)
        else:
            assert b.id and b.name == "get_weather" and isinstance(b.input, dict)
    if "tool_use" in kinds:
        assert m.stop_reason == "tool_use"


def as_openai(messages, system=None):
    """The OpenAI-shaped twin of an Anthropic conversation (as /tokenize takes it)."""
    out = [{"role": "system", "content": system}] if system else []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        if m["role"] == "assistant":
            msg = {"role": "assistant", "content": "".join(b["text"] for b in content if b["type"] == "text")}
            reasoning = "".join(b["thinking"] for b in content if b["type"] == "thinking")
            if reasoning:
                msg["reasoning_content"] = reasoning
            calls = [
                {"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": json.dumps(b["input"])}}
                for b in content
                if b["type"] == "tool_use"
            ]
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
        else:
            for b in content:
                if b["type"] == "tool_result":
                    out.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": b["content"]})
            text = "".join(b["text"] for b in content if b["type"] == "text")
            if text:
                out.append({"role": "user", "content": text})
    return out


ANTHROPIC_TOOL_HISTORY = [
    {"role": "user", "content": "What's the weather in Paris?"},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_0001", "name": "get_weather", "input": {"city": "Paris"}},
        ],
    },
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_0001", "content": "sunny, 21 C"}]},
]

THINKING_ON = {"type": "enabled", "budget_tokens": 1024}


def stream_message(messages, **kw):
    """Streams; checks the event order; returns (final message, raw event types)."""
    kinds = []
    with an.messages.stream(
        model=served_model(), max_tokens=MAX_TOKENS, messages=messages, extra_body=GREEDY, **kw
    ) as stream:
        block = None  # (index, type) of the open block
        next_index = 0
        signed = False
        for ev in stream:
            if ev.type not in (
                "message_start", "content_block_start", "content_block_delta", "content_block_stop",
                "message_delta", "message_stop", "ping",
            ):
                continue  # the SDK's own derived events (text, thinking, signature, input_json)
            kinds.append(ev.type)
            if ev.type == "message_start":
                assert len(kinds) == 1, kinds
                assert ev.message.content == [] and ev.message.role == "assistant"
            elif ev.type == "content_block_start":
                assert block is None and ev.index == next_index, (kinds, ev)
                block = (ev.index, ev.content_block.type)
                signed = False
            elif ev.type == "content_block_delta":
                assert block is not None and ev.index == block[0], (kinds, ev)
                want = {"text": ("text_delta",), "thinking": ("thinking_delta", "signature_delta"),
                        "tool_use": ("input_json_delta",)}[block[1]]
                assert ev.delta.type in want, (block, ev.delta)
                assert not signed, "a delta after the signature"
                signed = ev.delta.type == "signature_delta"
            elif ev.type == "content_block_stop":
                assert block is not None and ev.index == block[0], (kinds, ev)
                if block[1] == "thinking":
                    assert signed, "a thinking block without a signature_delta"
                block = None
                next_index += 1
            elif ev.type == "message_delta":
                assert block is None and "message_delta" not in kinds[:-1], kinds
                assert ev.delta.stop_reason is not None and ev.usage.output_tokens >= 1
            elif ev.type == "message_stop":
                assert kinds[-2] == "message_delta", kinds
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
    return final, kinds


def prompt_tokens(m):
    """The whole prompt of a reply: Anthropic's `input_tokens` leaves out the tokens read from
    (or written to) the prompt cache."""
    u = m.usage
    return u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)


def same_message(a, b):
    assert [blk.model_dump() for blk in a.content] == [blk.model_dump() for blk in b.content]
    assert a.stop_reason == b.stop_reason
    assert (prompt_tokens(a), a.usage.output_tokens) == (prompt_tokens(b), b.usage.output_tokens)


@pytest.mark.parametrize(
    "label,kw,thinking",
    [
        ("no thinking", {"thinking": OFF}, False),
        ("thinking", {"thinking": THINKING_ON}, True),
        ("tools", {"thinking": OFF, "tools": [WEATHER_ANTHROPIC]}, False),
        ("tools, thinking", {"thinking": THINKING_ON, "tools": [WEATHER_ANTHROPIC], "tool_choice": {"type": "auto"}},
         True),
        ("system", {"thinking": OFF, "system": "Be brief."}, False),
    ],
)
def test_messages_whole_and_streamed_agree(label, kw, thinking):
    messages = [{"role": "user", "content": f"Say hi ({label})."}]
    whole = message(messages, **kw)
    check_message(whole, thinking)
    counted = an.messages.count_tokens(model=served_model(), messages=messages, **kw)
    assert counted.input_tokens == prompt_tokens(whole)
    final, kinds = stream_message(messages, **kw)
    check_message(final, thinking)
    same_message(final, whole)
    assert kinds.count("content_block_start") == len(whole.content)


def test_messages_default_thinking_is_the_servers():
    """No `thinking` field: the server's default (on for `dsv4 serve`) decides, as /tokenize's."""
    messages = [{"role": "user", "content": "Hi"}]
    m = message(messages)
    check_message(m, thinking=True)
    assert prompt_tokens(m) == tokenize(as_openai(messages))["count"]


def test_messages_tool_use_history():
    for kw, thinking in (({"thinking": OFF}, False), ({"thinking": THINKING_ON}, True)):
        whole = message(ANTHROPIC_TOOL_HISTORY, tools=[WEATHER_ANTHROPIC], **kw)
        check_message(whole, thinking)
        final, _ = stream_message(ANTHROPIC_TOOL_HISTORY, tools=[WEATHER_ANTHROPIC], **kw)
        same_message(final, whole)
        twin = tokenize(as_openai(ANTHROPIC_TOOL_HISTORY), tools=[WEATHER_OPENAI], thinking=ON if thinking else OFF)
        assert prompt_tokens(whole) == twin["count"]


def test_messages_thinking_history_round_trip():
    """A reply's thinking block (with its signature) sent back as history is accepted and
    counted like the same turn with `reasoning_content` in the OpenAI shape."""
    messages = [{"role": "user", "content": "Think first."}]
    first = message(messages, thinking=THINKING_ON)
    check_message(first, True)
    back = [b.model_dump(exclude_none=True) for b in first.content]
    for b in back:
        b.pop("citations", None)
    history = messages + [{"role": "assistant", "content": back}, {"role": "user", "content": "Go on."}]
    second = message(history, thinking=THINKING_ON)
    check_message(second, True)
    counted = an.messages.count_tokens(model=served_model(), messages=history, thinking=THINKING_ON)
    assert counted.input_tokens == prompt_tokens(second)
    assert counted.input_tokens == tokenize(as_openai(history), thinking=ON)["count"]


@pytest.mark.parametrize(
    "label,messages,system,tools,thinking",
    [
        ("user", [{"role": "user", "content": "Hello there"}], None, None, OFF),
        ("system", [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "Be brief.", None, OFF),
        ("thinking", [{"role": "user", "content": "Hello"}], None, None, THINKING_ON),
        ("tools", [{"role": "user", "content": "Weather?"}], None, [WEATHER_ANTHROPIC], OFF),
        ("tool history", ANTHROPIC_TOOL_HISTORY, "Use tools.", [WEATHER_ANTHROPIC], OFF),
        ("tool history, thinking", ANTHROPIC_TOOL_HISTORY, None, [WEATHER_ANTHROPIC], THINKING_ON),
    ],
)
def test_count_tokens_equals_tokenize(label, messages, system, tools, thinking):
    kw = {"thinking": thinking}
    if system:
        kw["system"] = system
    if tools:
        kw["tools"] = tools
    counted = an.messages.count_tokens(model=served_model(), messages=messages, **kw)
    twin = tokenize(
        as_openai(messages, system),
        tools=[WEATHER_OPENAI] if tools else None,
        thinking=ON if thinking["type"] == "enabled" else OFF,
    )
    assert counted.input_tokens == twin["count"], label


def test_anthropic_errors_are_sdk_exceptions():
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=BASE_URL, api_key="wrong", max_retries=0).messages.create(
            model=served_model(), max_tokens=1, messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(anthropic.NotFoundError):
        an.messages.create(model="no-such-model", max_tokens=1, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError):
        an.messages.create(model=served_model(), max_tokens=1, messages=[])
