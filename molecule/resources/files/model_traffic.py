#!/usr/bin/env python3
"""Mixed model traffic through the gateway, with a JSON summary of what came back (lab tests only).

Issue 14's "Done when": requests for each model, by catalog name and by exo id, plain and streamed,
plus `auto` requests of both kinds (reasoning-style: reasoning_effort set, or the marker in the
system message; everything else), shuffled with a fixed seed so the models interleave, sent by a
few concurrent clients. Every answer is read to its end. Standard library only.

    model_traffic.py --url http://127.0.0.1:18080 --key K
                     --model Qwen2.5-1.5B-Instruct=qwen2.5-1.5b-instruct-rkllm --model DeepSeek-R1-1.5B=deepseek-r1-1.5b-rkllm
                     --reasoning-model DeepSeek-R1-1.5B --fast-model Qwen2.5-1.5B-Instruct
                     [--per-model 100] [--auto-per-kind 12] [--auto-name auto] [--marker '#reason']
                     [--concurrency 6] [--timeout 120] [--stream-every 4] [--seed 14]

Prints {"requests", "failed", "wrong_model", "incomplete", "seconds", "by_kind", "by_board", "samples"}:
failed = no 200 or no text; wrong_model = the answer's `model` is neither the catalog name nor the exo
id of the model the request asked for (for `auto`, the model its rule picks); incomplete = an answer
that does not end as the lab's stand-in model ends every answer (" Done."), i.e. was cut short.
"""

import argparse
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request

ANSWER_END = " Done."  # lab/stand-ins/rkllama/src/runtime.py: every answer ends so


def plan(args, models):
    """The requests: (kind, expected catalog name, body)."""
    out = []
    for name, exo_id in models.items():
        for i in range(args.per_model):
            asked = name if i % 2 == 0 else exo_id  # half by catalog name, half by exo id
            out.append(("model:" + ("name" if i % 2 == 0 else "exo_id"), name,
                        {"model": asked, "messages": [{"role": "user", "content": "Say hello."}]}))
    for i in range(args.auto_per_kind):
        if i % 2 == 0:
            body = {"model": args.auto_name, "reasoning_effort": "low",
                    "messages": [{"role": "user", "content": "Is 91 prime?"}]}
            kind = "auto:reasoning_effort"
        else:
            body = {"model": args.auto_name, "messages": [
                {"role": "system", "content": "Think step by step. %s" % args.marker},
                {"role": "user", "content": "Is 91 prime?"}]}
            kind = "auto:marker"
        out.append((kind, args.reasoning_model, body))
        out.append(("auto:fast", args.fast_model,
                    {"model": args.auto_name, "messages": [{"role": "user", "content": "Say hello."}]}))
    rng = random.Random(args.seed)
    rng.shuffle(out)
    for index, (_kind, _expected, body) in enumerate(out):
        body["stream"] = args.stream_every > 0 and index % args.stream_every == 0
    return out


def send(args, body):
    """One request read to its end: (status, text, answer's model, finish_reason, board, error)."""
    headers = {"Content-Type": "application/json"}
    if args.key:
        headers["Authorization"] = "Bearer " + args.key
    req = urllib.request.Request(args.url.rstrip("/") + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    text, model, finish = "", None, None
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:  # nosec B310 (lab addresses only)
            board = resp.headers.get("X-Rkllm-Board")
            if not body.get("stream"):
                answer = json.load(resp)
                choice = answer["choices"][0]
                return resp.status, choice["message"]["content"] or "", answer.get("model"), choice.get("finish_reason"), board, None
            for raw in resp:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:].strip())
                choice = chunk["choices"][0]
                text += (choice.get("delta") or {}).get("content") or ""
                model = chunk.get("model") or model
                finish = choice.get("finish_reason") or finish
            return resp.status, text, model, finish, board, None
    except urllib.error.HTTPError as exc:
        return exc.code, "", None, None, exc.headers.get("X-Rkllm-Board"), exc.read().decode("utf-8", "replace")[:300]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        return None, text, model, finish, None, "%s: %s" % (type(exc).__name__, exc)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", default="")
    parser.add_argument("--model", action="append", required=True, help="CATALOG_NAME=EXO_ID, once per model")
    parser.add_argument("--reasoning-model", required=True)
    parser.add_argument("--fast-model", required=True)
    parser.add_argument("--per-model", type=int, default=100)
    parser.add_argument("--auto-per-kind", type=int, default=12)
    parser.add_argument("--auto-name", default="auto")
    parser.add_argument("--marker", default="#reason")
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--stream-every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args(argv)
    models = dict(m.split("=", 1) for m in args.model)
    if args.reasoning_model not in models or args.fast_model not in models:
        parser.error("--reasoning-model and --fast-model must be among the --model names")

    todo = plan(args, models)
    results = [None] * len(todo)
    lock = threading.Lock()
    cursor = [0]

    def worker():
        while True:
            with lock:
                index = cursor[0]
                cursor[0] += 1
            if index >= len(todo):
                return
            kind, expected, body = todo[index]
            started = time.monotonic()
            status, text, model, finish, board, error = send(args, body)
            results[index] = {"kind": kind, "asked": body["model"], "stream": body["stream"], "expected": expected,
                              "status": status, "model": model, "finish_reason": finish, "board": board, "error": error,
                              "seconds": round(time.monotonic() - started, 3), "text": text[-40:]}

    started = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, args.concurrency))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = round(time.monotonic() - started, 1)

    failed, wrong, incomplete, by_kind, by_board = [], [], [], {}, {}
    for r in results:
        ok_names = {r["expected"], models[r["expected"]]}
        by_kind.setdefault(r["kind"], {"requests": 0, "failed": 0, "wrong_model": 0})["requests"] += 1
        if r["status"] != 200 or not r["text"]:
            failed.append(r)
            by_kind[r["kind"]]["failed"] += 1
            continue
        if r["model"] not in ok_names:
            wrong.append(r)
            by_kind[r["kind"]]["wrong_model"] += 1
        if not r["text"].endswith(ANSWER_END):
            incomplete.append(r)
        board = by_board.setdefault(r["board"] or "unknown", {})
        board[r["expected"]] = board.get(r["expected"], 0) + 1
    summary = {"requests": len(results), "failed": len(failed), "wrong_model": len(wrong), "incomplete": len(incomplete),
               "seconds": seconds, "by_kind": by_kind, "by_board": by_board,
               "samples": {"failed": failed[:5], "wrong_model": wrong[:5], "incomplete": incomplete[:5]}}
    json.dump(summary, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
