"""Differential corpus for the Rust chat encoder and parser (core/tests/chat_differential.rs).

Runs DeepSeek's official `encoding_dsv4.py` (not part of this repository: pass the directory that
holds it, e.g. the checkpoint's `encoding/`) on seeded random conversations and completions, and
writes what it returns, or that it raised, as JSON:

    python3 reference_driver.py /path/to/encoding out.json [count] [seed]
    DSV4_CHAT_REFERENCE_CORPUS=out.json cargo test -p dsv4-core --test chat_differential -- --ignored

Inputs on which the Rust encoder deliberately differs (null or list-valued content outside tool
results) are not generated.
"""

import json
import random
import sys

sys.path.insert(0, sys.argv[1])
from encoding_dsv4 import encode_messages, parse_message_from_completion_text  # noqa: E402

OUT = sys.argv[2]
COUNT = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
rng = random.Random(int(sys.argv[4]) if len(sys.argv) > 4 else 1)

TEXTS = ["", "hi", "Hello, world!", "多语言 テキスト", "a\nb", "  padded  ", "emoji 💡", "quote \" and \\ back",
         "x" * 40, "</think> inside", "<think>", "｜DSML｜", "tab\tand\rcr", "\n\n", "1 < 2 > 0"]
IDS = ["c1", "c2", "c3", "call_001", "", "dup"]
NAMES = ["search", "get_weather", "f", "工具", "name with space"]


def rand_value(depth=0):
    r = rng.random()
    if depth > 2 or r < 0.35:
        return rng.choice(TEXTS)
    if r < 0.5:
        return rng.choice([0, 1, -7, 42, 2**40, -(2**53), 3.5, 0.1, 1e-7, 1e16, 123.456, -0.0, 1e22])
    if r < 0.6:
        return rng.choice([True, False, None])
    if r < 0.8:
        return [rand_value(depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["a", "b", "key", "ключ", "x y"]): rand_value(depth + 1) for _ in range(rng.randint(0, 3))}


def rand_arguments():
    r = rng.random()
    if r < 0.75:
        return json.dumps({rng.choice(["q", "location", "n", "deep", "k"]): rand_value() for _ in range(rng.randint(0, 3))},
                          ensure_ascii=rng.random() < 0.3)
    if r < 0.85:
        return rng.choice(["not json", "", "{", "{\"a\":1,\"a\":2}"])
    return json.dumps(rand_value())  # may decode to a non-object: the reference raises


def rand_tool():
    return {"type": "function", "function": {"name": rng.choice(NAMES), "description": rng.choice(TEXTS),
                                             "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}


def rand_message():
    role = rng.choice(["system", "user", "user", "user", "assistant", "assistant", "assistant", "tool", "tool",
                       "developer", "latest_reminder"])
    m = {"role": role}
    if role == "tool":
        if rng.random() < 0.8:
            m["tool_call_id"] = rng.choice(IDS)
        m["content"] = rng.choice(TEXTS) if rng.random() < 0.8 else [
            {"type": rng.choice(["text", "text", "image"]), "text": rng.choice(TEXTS)} for _ in range(rng.randint(1, 3))]
        return m
    m["content"] = rng.choice(TEXTS)
    if role == "developer" and rng.random() < 0.9 and not m["content"]:
        m["content"] = "dev"
    if role == "assistant":
        if rng.random() < 0.3:
            del m["content"]
        if rng.random() < 0.7:
            m["reasoning_content"] = rng.choice(TEXTS)
        if rng.random() < 0.4:
            calls = []
            for _ in range(rng.randint(0, 3)):
                tc = {"type": "function", "function": {"name": rng.choice(NAMES), "arguments": rand_arguments()}}
                if rng.random() < 0.8:
                    tc["id"] = rng.choice(IDS)
                calls.append(tc)
            m["tool_calls"] = calls
    if role in ("system", "developer", "user") and rng.random() < 0.15:
        m["tools"] = [rand_tool() for _ in range(rng.randint(0, 2))]
    if role in ("system", "developer") and rng.random() < 0.1:
        m["response_format"] = rand_value()
    if rng.random() < 0.05:
        m["task"] = rng.choice(["action", "query", "title", "authority", "domain", "read_url"])
    return m


def run(f):
    try:
        return {"ok": f()}
    except Exception as e:  # noqa: BLE001 - the corpus records that the reference refused
        return {"err": f"{type(e).__name__}: {e}"}


ALPHABET = ["<", "｜", "DSML", "｜DSML｜", "</think>", "<think>", "\n", "\n\n", "\"", " ", ">", "/", "a", "é", ">\n",
            "<｜end▁of▁sentence｜>", "\n\n<｜DSML｜tool_calls", "<｜DSML｜invoke", "</｜DSML｜invoke>", "<｜DSML｜parameter",
            "</｜DSML｜parameter>", "</｜DSML｜tool_calls>", " name=\"", "\" string=\"true\">", "\" string=\"false\">",
            "{", "}", "1"]


def mutate(text):
    for _ in range(rng.randint(1, 3)):
        r = rng.random()
        i = rng.randint(0, len(text))
        if r < 0.4:
            text = text[:i] + rng.choice(ALPHABET) + text[i:]
        elif r < 0.8 and text:
            j = min(len(text), i + rng.randint(1, 12))
            text = text[:i] + text[j:]
        else:
            text = text[:i]
    return text


cases = []
completions = []
for _ in range(COUNT):
    msgs = [rand_message() for _ in range(rng.randint(0, 7))]
    if rng.random() < 0.3 and msgs and msgs[-1]["role"] == "assistant":
        msgs[-1]["wo_eos"] = True
    thinking = rng.choice(["chat", "thinking", "thinking"])
    drop = rng.random() < 0.8
    bos = rng.random() < 0.9
    effort = rng.choice([None, None, "high", "max"])
    split = rng.randint(0, len(msgs)) if rng.random() < 0.2 else 0
    ctx, tail = msgs[:split], msgs[split:]
    res = run(lambda: encode_messages(tail, thinking, context=ctx or None, drop_thinking=drop,
                                      add_default_bos_token=bos, reasoning_effort=effort))
    cases.append({"context": ctx, "messages": tail, "thinking": thinking, "drop_thinking": drop, "bos": bos,
                  "effort": effort, **res})

    # A completion: one rendered assistant turn, often mutated.
    a = rand_message()
    a["role"] = "assistant"
    a.pop("task", None)
    a.pop("tools", None)
    turn = run(lambda: encode_messages([{"role": "user", "content": "q"}, a], thinking))
    if "ok" in turn:
        text = turn["ok"].split("<｜Assistant｜>", 1)[1]
        text = text[len("<think>"):] if text.startswith("<think>") else text[len("</think>"):]
        if rng.random() < 0.6:
            text = mutate(text)
        completions.append({"text": text, "thinking": thinking,
                            **run(lambda: parse_message_from_completion_text(text, thinking))})

with open(OUT, "w", encoding="utf-8") as f:
    json.dump({"cases": cases, "completions": completions}, f, ensure_ascii=False)
print(f"{len(cases)} conversations ({sum('ok' in c for c in cases)} encoded), "
      f"{len(completions)} completions ({sum('ok' in c for c in completions)} parsed)")
