"""The lab runtime: loads ~/RKLLAMA/lib/librkllmrt.so like the fork and checks models like RKLLM.

rkllm.fleet lab stand-in. The shared object is loaded with ctypes at import time (as the fork
does), so a missing library or one built for another architecture stops the server before it
starts. Model files are lab models: line 1 `RKLLM-LAB-MODEL 1`, line 2 a JSON header, filler,
and the SHA-256 of everything before it as the last 32 bytes.
"""

import ctypes
import hashlib
import json
import os
import re
import sys
import threading
import time

from src import callback, hardware

LIB_PATH = os.path.expanduser("~/RKLLAMA/lib/librkllmrt.so")
LIB = ctypes.CDLL(LIB_PATH)


def _runtime_version():
    with open(LIB_PATH, "rb") as f:
        match = re.search(rb"rkllm-runtime version: ([0-9]+\.[0-9]+\.[0-9]+)", f.read())
    return match.group(1).decode() if match else "unknown"


RUNTIME_VERSION = _runtime_version()


def log(line):
    print(line, file=sys.stderr, flush=True)


def _vtuple(text):
    return tuple(int(p) for p in re.findall(r"[0-9]+", text)[:3])


# Lab only: a test may run the simulated NPU faster for a while (a board with a faster chip), by
# writing a factor to this file under the board's sysroot; every generation started meanwhile
# runs its prefill and tokens that many times faster. Nothing else changes: answers as long,
# requests serialised and read as the fork does, model loads as slow (RKLLM_LAB_LOAD_SECONDS).
NPU_SPEED_FILE = "lab-npu-speed"


def npu_speed():
    """The factor in <sysroot>/lab-npu-speed, 1 when the file is absent or not a positive number."""
    try:
        with open(os.path.join(hardware.SYSROOT, NPU_SPEED_FILE), encoding="ascii") as f:
            value = float(f.read().strip())
    except (OSError, ValueError):
        return 1.0
    return value if value > 0 else 1.0


class RuntimeInitError(RuntimeError):
    """What rkllm_init's failure looks like from Python."""


def read_model(path):
    """Validate a lab .rkllm file the way the runtime would; return its header."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise RuntimeInitError(f"E rkllm: failed to open model file {path}: {exc.strerror}") from exc
    body, digest = data[:-32], data[-32:]
    lines = body.split(b"\n", 2)
    if len(data) < 64 or lines[0] != b"RKLLM-LAB-MODEL 1" or hashlib.sha256(body).digest() != digest:
        raise RuntimeInitError("E rkllm: invalid rkllm model!")
    try:
        header = json.loads(lines[1])
    except ValueError as exc:
        raise RuntimeInitError("E rkllm: invalid rkllm model!") from exc
    return header


class Model:
    """One model loaded on the (simulated) NPU."""

    def __init__(self, path, max_new_tokens, temperature, fault=None):
        board = hardware.platform()
        log(f"I rkllm: rkllm-runtime version: {RUNTIME_VERSION}, rknpu driver version: {hardware.driver_version()}, "
            f"platform: {(board or 'unknown').upper()}")
        if fault == "load_fails":
            log("E RKNN: failed to malloc npu memory")
            log("E rkllm: rkllm_init failed")
            raise RuntimeInitError("rkllm_init failed")
        header = read_model(path)
        if _vtuple(header.get("toolkit_version", "0")) > _vtuple(RUNTIME_VERSION):
            log("E rkllm: invalid rkllm model!")
            raise RuntimeInitError(f"model converted with rkllm-toolkit {header.get('toolkit_version')} is newer than "
                                   f"runtime {RUNTIME_VERSION}")
        if header.get("platform") != board:
            log(f"E rkllm: the model is for {str(header.get('platform')).upper()} but this is {(board or 'unknown').upper()}")
            log("E rkllm: rkllm_init failed")
            raise RuntimeInitError("rkllm_init failed")
        # rkllm_init (src/rkllm.py:76-79 at 1d8d210) puts the weights into NPU memory: 10 to 30 s for a
        # 1.5B model on a real board, during which /load_model has not answered and /current_model still
        # says no model is loaded. RKLLM_LAB_LOAD_SECONDS is that time in the lab (default 0: instant).
        time.sleep(max(float(os.environ.get("RKLLM_LAB_LOAD_SECONDS", "0") or 0), 0.0))
        log(f"I rkllm: rkllm-toolkit version: {header.get('toolkit_version')}, max_context_limit: {header.get('max_context')}, "
            f"npu_core_num: {3 if board == 'rk3588' else 2}, target_platform: {board.upper()}, model_dtype: {header.get('dtype')}")
        self.name = header.get("model", "model")
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.rate = float(os.environ.get("RKLLM_LAB_TOKENS_PER_SECOND", "8"))
        self.answer_tokens = int(os.environ.get("RKLLM_LAB_ANSWER_TOKENS", "24"))
        # Prompt processing before the first token (a short prompt on an RK3588: about 0.2 s).
        self.prefill_seconds = float(os.environ.get("RKLLM_LAB_PREFILL_SECONDS", "0.2"))
        # DeepSeek-R1 "thinks" first: tokens the runtime outputs as [PAD151935] (see src/callback.py).
        self.thinking_tokens = int(os.environ.get("RKLLM_LAB_THINKING_TOKENS", "16")) if self.thinks else 0
        self._abort = threading.Event()

    @property
    def thinks(self):
        return "deepseek" in self.name.lower()

    def tokens(self):
        """The raw token texts one generation outputs, MAX_NEW_TOKENS at most (thinking counts too)."""
        words = ["The", " NPU", " on", " this", " board", " answers", " one", " request", " at", " a", " time", "."]
        raw = ["[PAD151935]"] * self.thinking_tokens
        raw += [words[i % len(words)] if i < self.answer_tokens - 1 else " Done." for i in range(self.answer_tokens)]
        return raw[:self.max_new_tokens]

    def run(self, prompt_tokens):
        """rkllm_run (src/rkllm.py:135-174): blocks until the generation ends, calling the callback per token.

        Two calls at once on one model (the fork does that for concurrent streams) both run, and
        both callbacks feed the one shared buffer.
        """
        del prompt_tokens
        self._abort.clear()
        speed = npu_speed()
        rate = self.rate * speed
        delay = 1.0 / rate if rate > 0 else 0.0
        time.sleep(max(self.prefill_seconds / speed - delay, 0.0))
        for text in self.tokens():
            time.sleep(delay)
            if self._abort.is_set():
                break
            callback.callback_impl(text, callback.RKLLM_RUN_NORMAL)
        callback.callback_impl(None, callback.RKLLM_RUN_FINISH)

    def abort(self):
        """rkllm_abort (src/rkllm.py:202-204): the running generation stops at its next token."""
        self._abort.set()
