"""The runtime callback: turns the runtime's tokens into the shared buffer's text (rkllm.fleet lab stand-in).

Imitates src/callback.py of jfreed-dev/rkllama at 1d8d210, including its DeepSeek "thinking"
filter: the runtime outputs each thinking token as `[PAD151935]`; the callback puts `<think>`
in the buffer at the first one (callback.py:76-81), nothing for each further one
(callback.py:82-87: `return`), and `</think> (N tokens)\n` before the first real token
(callback.py:90-95) or, when the generation ends while still thinking,
`</think> (N thinking tokens)\n` (callback.py:32-40). So while the model thinks, a reader of
the buffer gets one `<think>` and then nothing at all for as long as the thinking lasts.
"""

import re

from src import variables

# callback.py:8
PAD_TOKEN_PATTERN = re.compile(r"\[PAD(\d+)\]")

# The runtime's call states (src/classes.py:17-20).
RKLLM_RUN_NORMAL = 0
RKLLM_RUN_WAITING = 1
RKLLM_RUN_FINISH = 2
RKLLM_RUN_ERROR = 3

# callback.py:15-16: module state, shared by every generation (and by two at once).
_in_thinking_block = False
_thinking_token_count = 0


def callback_impl(text, state):
    """One runtime callback: TEXT is the token's text (str) or None."""
    global _in_thinking_block, _thinking_token_count  # pylint: disable=global-statement
    if state == RKLLM_RUN_FINISH:
        # callback.py:32-40
        if _in_thinking_block:
            variables.global_text.append(f"</think> ({_thinking_token_count} thinking tokens)\n")
            _in_thinking_block = False
            _thinking_token_count = 0
        return
    if state != RKLLM_RUN_NORMAL or not text:
        return
    if PAD_TOKEN_PATTERN.match(text):
        # callback.py:72-87
        if not _in_thinking_block:
            _in_thinking_block = True
            _thinking_token_count = 0
            variables.global_text.append("<think>")
        _thinking_token_count += 1
        return
    if _in_thinking_block:
        # callback.py:90-95
        variables.global_text.append(f"</think> ({_thinking_token_count} tokens)\n")
        _in_thinking_block = False
        _thinking_token_count = 0
    variables.global_text.append(text)  # callback.py:97
