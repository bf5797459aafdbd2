"""/generate: runs a generation and reads the shared buffer (rkllm.fleet lab stand-in).

Imitates src/process.py of jfreed-dev/rkllama at 1d8d210, bugs included, each behind a flag
that the lab's own patches (lab/stand-ins/patches/rkllama/, one per real patch, same slug)
turn on, so the lab runs the patched fork and, with rkllama_patches_enabled: false, the real one.

- The read loops (process.py:72-79 plain, 102-126 streamed) stop as soon as the runtime thread
  has ended, without emptying the shared buffer, and nothing clears the buffer when a request
  starts: the last token of an answer usually goes to the start of the next request.
  Fixed by 0001-drain-token-buffer (LAB_PATCH_DRAIN_BUFFER).
- The lock taken in server.py:277 is released in `finally` (process.py:131-132) as soon as the
  streamed Response object is returned, before a single token is read: two concurrent streams
  run two generations at once and read each other's tokens from the shared buffer. Plain
  requests hold it to the end. Fixed by 0002-serialize-streams (LAB_PATCH_SERIALIZE_STREAMS).
"""

import json
import threading
import time

from flask import Response, jsonify, request

from src import tokenizer, variables

# Turned on by lab/stand-ins/patches/rkllama/0001-drain-token-buffer.patch.
LAB_PATCH_DRAIN_BUFFER = False

# Turned on by lab/stand-ins/patches/rkllama/0002-serialize-streams.patch.
LAB_PATCH_SERIALIZE_STREAMS = False

SYSTEM = "Tu es un assistant artificiel."  # src/variables.py:11 (the Modelfile's SYSTEM is never read)


def _take_leftovers():
    """0001: what the runtime put in the buffer after the read loop last looked."""
    left = []
    while variables.global_text:
        left.append(variables.global_text.pop(0))
    return left


def _end_stream(model, stream):
    """0002: when the stream's response closes (finished, or the client went away), end its generation, then unlock."""
    if stream.get("ended"):
        return
    stream["ended"] = True
    thread = stream.get("thread")
    try:
        if thread is not None and thread.is_alive():
            model.abort()
            thread.join()
    finally:
        variables.verrou.release()


def Request(model):  # pylint: disable=invalid-name,too-many-statements  (the fork's name)
    """process.py:7-133; the caller holds variables.verrou (server.py:277)."""
    release_lock = True
    try:
        data = request.get_json(silent=True)
        if not (data and "messages" in data):
            return jsonify({"status": "error", "message": "Données JSON invalides !"}), 400
        variables.global_status = -1  # process.py:16
        if LAB_PATCH_DRAIN_BUFFER:
            # 0001: tokens an earlier generation left behind are not this answer's.
            del variables.global_text[:]
        llm_response = {
            "id": "rkllm_chat", "object": "rkllm_chat", "created": None, "choices": [],
            # process.py:24-29: tokens_per_second starts as the integer 0 and becomes a float at the
            # read loop's first pass (process.py:123).
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "tokens_per_second": 0, "total_tokens": 0},
        }
        # process.py:37-50: the tokenizer is loaded on every request; the fork's system prompt goes
        # first when the chat template allows a system role; roles must alternate (ValueError => 500).
        config = tokenizer.load(model.huggingface_path)
        prompt = data["messages"]
        if "raise_exception('System role not supported')" not in (config.get("chat_template") or ""):
            prompt = [{"role": "system", "content": SYSTEM}] + prompt
        for before, after in zip(prompt, prompt[1:]):
            if before.get("role") == after.get("role"):
                raise ValueError("Les rôles doivent alterner entre 'user' et 'assistant'.")
        prompt_tokens = tokenizer.count_tokens(prompt)
        llm_response["usage"]["prompt_tokens"] = llm_response["usage"]["total_tokens"] = prompt_tokens

        if not data.get("stream"):
            # process.py:57-91
            worker = threading.Thread(target=model.run, args=(prompt_tokens,))
            worker.start()
            finished, count, start, text = False, 0, time.time(), ""
            while not finished:
                while len(variables.global_text) > 0:
                    count += 1
                    text += variables.global_text.pop(0)
                    time.sleep(0.005)
                    worker.join(timeout=0.005)
                # The fork spins here without sleeping and its reader usually loses the interpreter
                # lock between looking at the buffer and asking whether the thread lives (inside
                # is_alive); the stand-in sleeps 1 ms at that point: the same race, and no busy core.
                time.sleep(0.001)
                finished = not worker.is_alive()
            if LAB_PATCH_DRAIN_BUFFER:
                for token in _take_leftovers():
                    count += 1
                    text += token
            total = time.time() - start
            llm_response["choices"] = [{"role": "assistant", "content": text, "logprobs": None, "finish_reason": "stop"}]
            llm_response["usage"]["total_tokens"] = count + llm_response["usage"]["prompt_tokens"]
            llm_response["usage"]["completion_tokens"] = count
            llm_response["usage"]["tokens_per_second"] = count / total
            return jsonify(llm_response), 200

        stream = {"thread": None, "ended": False}

        def chunk(token, count):
            llm_response["choices"] = [{"role": "assistant", "content": token, "logprobs": None,
                                        "finish_reason": "stop" if variables.global_status == 1 else None}]
            llm_response["usage"]["completion_tokens"] = count
            llm_response["usage"]["total_tokens"] += 1
            return f"{json.dumps(llm_response)}\n\n"

        def generate():
            # process.py:94-126
            worker = threading.Thread(target=model.run, args=(prompt_tokens,))
            stream["thread"] = worker
            worker.start()
            finished, count, start = False, 0, time.time()
            while not finished:
                while len(variables.global_text) > 0:
                    count += 1
                    yield chunk(variables.global_text.pop(0), count)
                total = time.time() - start
                llm_response["usage"]["tokens_per_second"] = count / total
                # The runtime's last token usually lands during this wait, and the loop then ends
                # without looking at the buffer again (process.py:125-126).
                worker.join(timeout=0.005)
                finished = not worker.is_alive()
            if LAB_PATCH_DRAIN_BUFFER:
                for token in _take_leftovers():
                    count += 1
                    yield chunk(token, count)

        response = Response(generate(), content_type="text/plain")
        if LAB_PATCH_SERIALIZE_STREAMS:
            # 0002: the lock is held until the stream is over; the next request waits its turn.
            response.call_on_close(lambda: _end_stream(model, stream))
            release_lock = False
        return response
    finally:
        if release_lock:
            variables.verrou.release()  # process.py:131-132
