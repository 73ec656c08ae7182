"""A smoke test of a running `dsv4 serve` (used by ci/gpu-check.sh on a GPU machine):
waits for /health, then one OpenAI chat completion, one streamed, one Anthropic message;
each must succeed with text. Prints one line per request; exits 1 on the first failure.
usage: python3 ci/serve_smoke.py PORT"""
import json, sys, time, urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"


def post(path, body):
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status, r.read().decode()


deadline = time.time() + 90
while True:
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            if r.status == 200:
                break
    except Exception as e:  # not up yet
        if time.time() > deadline:
            sys.exit(f"FAILED: /health did not answer within 90 s: {e}")
    time.sleep(0.5)

msgs = [{"role": "user", "content": "Hello"}]
status, text = post("/v1/chat/completions", {"model": "builtin:tiny", "messages": msgs, "max_tokens": 16})
reply = json.loads(text)
usage = reply["usage"]
print(f"chat: {status}, {usage['completion_tokens']} tokens, finish {reply['choices'][0]['finish_reason']}")
assert status == 200 and usage["completion_tokens"] > 0, text

status, text = post("/v1/chat/completions", {"model": "builtin:tiny", "messages": msgs, "max_tokens": 16, "stream": True})
chunks = [l for l in text.splitlines() if l.startswith("data: ")]
print(f"stream: {status}, {len(chunks)} events, ends with {chunks[-1] if chunks else None}")
assert status == 200 and chunks and chunks[-1] == "data: [DONE]", text

status, text = post("/v1/messages", {"model": "builtin:tiny", "messages": msgs, "max_tokens": 16})
reply = json.loads(text)
print(f"anthropic: {status}, stop {reply['stop_reason']}, {reply['usage']['output_tokens']} tokens")
assert status == 200 and reply["usage"]["output_tokens"] > 0, text
print("ok: serve on cuda answered the three APIs")
