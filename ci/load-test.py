#!/usr/bin/env python3
"""Load test for `dsv4 serve` (standard library only; loopback only).

Sends the same set of distinct streaming chat requests (greedy: temperature 0, fixed
max_tokens) at each concurrency level (default 1, 8, 64), and reports per level: failures,
wall time, generated tokens and aggregate generated tokens/s, mean time to first token. The
level-1 run is the reference: every request's output at the other levels must equal what the
same request gave when run one at a time (the text, the number of tokens, the finish reason
and, with logprobs, every token's bytes); differences are reported as mismatches. The server's
peak resident memory (VmHWM) is read from /proc when the script started the server
(`--server-cmd`) or was given its `--pid`.

    # against a running server
    ci/load-test.py --url http://127.0.0.1:8000 --api-key KEY --pid $(pgrep -n dsv4)
    # or start one (its command line must print its URL, as `dsv4 serve` does; --port 0 picks a free port)
    ci/load-test.py --server-cmd "target/release/dsv4 serve --model builtin:tiny --port 0"

Every request has a timeout (--request-timeout) and the whole run a deadline (--max-seconds).
Exits 1 on any failure or mismatch, 2 on bad arguments or a server that does not come up.
"""

import argparse
import http.client
import ipaddress
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

URL_LINE = re.compile(r"(http://[^\s/]+)/v1")


class Deadline(Exception):
    pass


def die(msg, code=2):
    print(f"load-test: {msg}", file=sys.stderr)
    sys.exit(code)


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


class Client:
    def __init__(self, base_url, api_key, deadline, request_timeout):
        u = urllib.parse.urlsplit(base_url)
        if u.scheme != "http" or not u.hostname:
            die(f"--url must be http://HOST:PORT, not {base_url}")
        if not is_loopback(u.hostname):
            die(f"{u.hostname} is not a loopback address: this script only talks to a local server")
        self.host, self.port = u.hostname, u.port or 80
        self.headers = {"content-type": "application/json"}
        if api_key:
            self.headers["authorization"] = f"Bearer {api_key}"
        self.deadline = deadline
        self.request_timeout = request_timeout

    def timeout(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Deadline("the run's --max-seconds deadline passed")
        return min(self.request_timeout, left)

    def request(self, method, path, body=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout())
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body), headers=self.headers)
            r = conn.getresponse()
            data = r.read()
            if r.status != 200:
                raise RuntimeError(f"{method} {path}: HTTP {r.status}: {data[:300]!r}")
            return json.loads(data)
        finally:
            conn.close()

    def stream_chat(self, body):
        """One streaming chat completion. Returns a dict with the joined text, the token bytes
        (with logprobs), finish_reason, completion tokens and time to first token."""
        start = time.monotonic()
        ends_at = start + self.timeout()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout())
        try:
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=self.headers)
            r = conn.getresponse()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
            content, reasoning, tokens = [], [], []
            finish, usage, ttft, done = None, None, None, False
            while True:
                if time.monotonic() > ends_at:
                    raise TimeoutError(f"no end of stream within {self.request_timeout} s")
                line = r.readline()
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"error event: {chunk['error']}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for ch in chunk.get("choices", []):
                    d = ch.get("delta") or {}
                    piece = (d.get("content") or "") + (d.get("reasoning_content") or "")
                    if piece and ttft is None:
                        ttft = time.monotonic() - start
                    content.append(d.get("content") or "")
                    reasoning.append(d.get("reasoning_content") or "")
                    for lp in ((ch.get("logprobs") or {}).get("content") or []):
                        tokens.append(bytes(lp["bytes"]).hex() if lp.get("bytes") is not None else lp["token"])
                    for lp in ((ch.get("logprobs") or {}).get("reasoning_content") or []):
                        tokens.append(bytes(lp["bytes"]).hex() if lp.get("bytes") is not None else lp["token"])
                    if ch.get("finish_reason"):
                        finish = ch["finish_reason"]
            if not done:
                raise RuntimeError("the stream ended without data: [DONE]")
            if finish is None:
                raise RuntimeError("no finish_reason in the stream")
            if usage is None:
                raise RuntimeError("no usage chunk (stream_options.include_usage)")
            return {
                "content": "".join(content),
                "reasoning": "".join(reasoning),
                "tokens": tokens,
                "finish": finish,
                "completion_tokens": usage["completion_tokens"],
                "ttft": ttft if ttft is not None else time.monotonic() - start,
                "latency": time.monotonic() - start,
            }
        finally:
            conn.close()


def vm_hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def start_server(cmd, deadline, log_path):
    args = shlex.split(cmd)
    log = open(log_path, "w+b")
    try:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        die(f"cannot start {args[0]}: {e}")
    while True:
        log.seek(0)
        m = URL_LINE.search(log.read().decode(errors="replace"))
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            stop_server(proc)
            die(f"the server exited with {proc.returncode} before printing its URL; its log:\n{tail(log_path)}")
        if time.monotonic() > deadline:
            stop_server(proc)
            die(f"the server printed no http://HOST:PORT/v1 URL in time; its log:\n{tail(log_path)}")
        time.sleep(0.2)


def tail(path, n=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError as e:
        return str(e)


def stop_server(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_health(client, deadline):
    while True:
        try:
            conn = http.client.HTTPConnection(client.host, client.port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            die("/health did not answer 200 in time")
        time.sleep(0.3)


def run_level(client, bodies, concurrency):
    """Runs every body with `concurrency` requests in flight; returns (results, errors, wall)."""
    results = [None] * len(bodies)
    errors = {}
    lock = threading.Lock()

    def one(i):
        try:
            out = client.stream_chat(bodies[i])
            results[i] = out
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported
            with lock:
                errors[i] = f"{type(e).__name__}: {e}"

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(len(bodies))))
    return results, errors, time.monotonic() - t0


def same(a, b):
    keys = ("content", "reasoning", "finish", "completion_tokens", "tokens")
    return all(a[k] == b[k] for k in keys), [k for k in keys if a[k] != b[k]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    ap.add_argument("--server-cmd", help="start this server command (it must print its URL) and stop it after")
    ap.add_argument("--pid", type=int, help="the server's pid, for its peak RSS")
    ap.add_argument("--api-key", default=os.environ.get("DSV4_API_KEY"))
    ap.add_argument("--model", help="model name (default: the one /v1/models lists)")
    ap.add_argument("--levels", default="1,8,64", help="concurrency levels; the first must be 1")
    ap.add_argument("--requests", type=int, default=64, help="requests per level (the same prompts at every level)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--no-logprobs", action="store_true", help="compare text only, not every token's bytes")
    ap.add_argument("--thinking", choices=["on", "off", "default"], default="default")
    ap.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="deadline for the whole run")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    levels = [int(x) for x in args.levels.split(",")]
    if not levels or levels[0] != 1 or any(n < 1 for n in levels):
        die("--levels must start with 1 (the one-at-a-time reference) and be positive")
    if args.requests < 1 or args.max_tokens < 1:
        die("--requests and --max-tokens must be positive")
    deadline = time.monotonic() + args.max_seconds

    proc, pid, url = None, args.pid, args.url
    log_path = os.path.join(tempfile.gettempdir(), f"dsv4-load-test-server.{os.getpid()}.log")
    if args.server_cmd:
        proc, url = start_server(args.server_cmd, deadline, log_path)
        pid = proc.pid
    exit_code = 0
    try:
        client = Client(url, args.api_key, deadline, args.request_timeout)
        wait_health(client, deadline)
        model = args.model or client.request("GET", "/v1/models")["data"][0]["id"]
        bodies = []
        for i in range(args.requests):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"Request {i}: write about the number {i * 7919 % 10007}."}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if not args.no_logprobs:
                body["logprobs"] = True
            if args.thinking != "default":
                body["thinking"] = {"type": "enabled" if args.thinking == "on" else "disabled"}
            bodies.append(body)

        print(f"load-test: {url}, model {model}, {args.requests} streaming requests per level, "
              f"max_tokens {args.max_tokens}, temperature 0, levels {levels}")
        rows, reference, all_errors = [], None, []
        for level in levels:
            try:
                results, errors, wall = run_level(client, bodies, level)
            except Deadline as e:
                die(str(e), 1)
            mismatches = []
            if reference is None:
                reference = results
            else:
                for i, (got, want) in enumerate(zip(results, reference)):
                    if got is None or want is None:
                        continue
                    ok, keys = same(got, want)
                    if not ok:
                        mismatches.append((i, keys, got, want))
            ok = [r for r in results if r is not None]
            tokens = sum(r["completion_tokens"] for r in ok)
            rows.append({
                "concurrency": level,
                "requests": len(bodies),
                "failures": len(errors),
                "wall_s": wall,
                "tokens": tokens,
                "tokens_per_s": tokens / wall if wall > 0 else 0.0,
                "mean_ttft_ms": 1000 * sum(r["ttft"] for r in ok) / max(1, len(ok)),
                "mean_latency_ms": 1000 * sum(r["latency"] for r in ok) / max(1, len(ok)),
                "mismatches": len(mismatches),
            })
            for i, e in sorted(errors.items())[:5]:
                all_errors.append(f"concurrency {level}, request {i}: {e}")
            if len(errors) > 5:
                all_errors.append(f"concurrency {level}: {len(errors) - 5} more failures")
            for i, keys, got, want in mismatches[:5]:
                all_errors.append(
                    f"concurrency {level}, request {i}: differs from the one-at-a-time run in {keys}: "
                    f"{(got['reasoning'] + got['content'])[:60]!r} vs {(want['reasoning'] + want['content'])[:60]!r}"
                )
        rss = vm_hwm_kib(pid) if pid else None

        print()
        print(f"{'concurrency':>11} {'requests':>8} {'failures':>8} {'wall s':>8} {'tokens':>7} "
              f"{'tokens/s':>9} {'ttft ms':>8} {'latency ms':>10} {'mismatches':>10}")
        for r in rows:
            print(f"{r['concurrency']:>11} {r['requests']:>8} {r['failures']:>8} {r['wall_s']:>8.2f} {r['tokens']:>7} "
                  f"{r['tokens_per_s']:>9.1f} {r['mean_ttft_ms']:>8.1f} {r['mean_latency_ms']:>10.1f} "
                  f"{r['mismatches']:>10}")
        base = rows[0]["tokens_per_s"]
        if len(rows) > 1 and base > 0:
            print(f"throughput at concurrency {rows[-1]['concurrency']} / concurrency 1: {rows[-1]['tokens_per_s'] / base:.2f}x")
        print(f"server peak RSS (VmHWM): {f'{rss / 1024:.1f} MiB' if rss else 'unknown (pass --pid or --server-cmd)'}")
        failures = sum(r["failures"] for r in rows)
        mismatches = sum(r["mismatches"] for r in rows)
        print(f"failures: {failures}, greedy mismatches against one at a time: {mismatches}")
        for e in all_errors:
            print(f"  {e}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows, "peak_rss_kib": rss, "errors": all_errors}, f, indent=2)
        if failures or mismatches:
            exit_code = 1
        if proc is not None and proc.poll() is not None:
            print(f"load-test: the server exited with {proc.returncode} during the run; its log:\n{tail(log_path)}")
            exit_code = 1
    finally:
        if proc is not None:
            stop_server(proc)
            if exit_code == 0:
                try:
                    os.remove(log_path)
                except OSError:
                    pass
            else:
                print(f"load-test: server log kept at {log_path}", file=sys.stderr)
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
