#!/usr/bin/env python3
"""Send chat completions and print every answer's text, finish and timing as JSON (lab tests only).

chat_load measures a load; this reads what each answer *says*, so a test can tell an answer cut
short, a token leaked from another answer, or two streams interleaved. Standard library only, so
it runs on the controller and inside the lab containers alike.

    chat_probe.py --url http://gateway:80 --model M [--key K] [--stream] [--concurrency N] [--requests N]
                  [--no-model] [--timeout S]

Prints {"results": [{"status", "content", "finish_reason", "model", "error", "seconds", "ttft"}, ...]}.
Every answer is read to its end. The run is bounded by --requests and each request by --timeout.
"""

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request


def one(args, index):
    body = {"messages": [{"role": "user", "content": args.prompt}], "stream": args.stream}
    if not args.no_model:
        body["model"] = args.model
    headers = {"Content-Type": "application/json"}
    if args.key:
        headers["Authorization"] = "Bearer " + args.key
    req = urllib.request.Request(args.url.rstrip("/") + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    start = time.monotonic()
    out = {"index": index, "status": None, "content": "", "finish_reason": None, "model": None, "error": None,
           "ttft": None, "board": None}
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:  # nosec B310 (lab addresses only)
            out["status"] = resp.status
            out["board"] = resp.headers.get("X-Rkllm-Board")
            if not args.stream:
                answer = json.load(resp)
                choice = answer["choices"][0]
                out["content"] = choice["message"]["content"]
                out["finish_reason"] = choice.get("finish_reason")
                out["model"] = answer.get("model")
            else:
                for raw in resp:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        continue
                    chunk = json.loads(data)
                    choice = chunk["choices"][0]
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece and out["ttft"] is None:
                        out["ttft"] = round(time.monotonic() - start, 3)
                    out["content"] += piece
                    out["model"] = chunk.get("model") or out["model"]
                    if choice.get("finish_reason"):
                        out["finish_reason"] = choice["finish_reason"]
    except urllib.error.HTTPError as exc:
        out["status"] = exc.code
        out["error"] = exc.read().decode("utf-8", "replace")[:500]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["seconds"] = round(time.monotonic() - start, 3)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--model", default="qwen2.5-1.5b-instruct-rkllm")
    p.add_argument("--key", default="")
    p.add_argument("--prompt", default="Say hello")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--no-model", action="store_true", help="send no model field at all")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--requests", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args()

    results, lock, counter = [], threading.Lock(), iter(range(args.requests))

    def worker():
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            result = one(args, index)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=worker) for _ in range(max(1, min(args.concurrency, args.requests)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.sort(key=lambda r: r["index"])
    json.dump({"results": results}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
