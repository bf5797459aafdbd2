"""Process-wide state shared by the request handler and the runtime callback (rkllm.fleet lab stand-in).

Imitates src/variables.py of jfreed-dev/rkllama at 1d8d210: one token buffer for the whole
server (variables.py:5, `global_text = []`), appended to by the runtime callback and popped by
whichever request is reading; one lock for /generate (variables.py:8, `verrou`). Neither is
per request or per model: what one generation leaves in the buffer is read by the next request,
even after the model was unloaded and another loaded.
"""

import threading

# process.py:16 resets this at each request; the fork's callback assigns a global of its own
# module instead (callback.py:5 imports these names, callback.py:33 `global_status = state`), so
# this one stays -1 and the stream's finish_reason (process.py:112) is always null.
global_status = -1
global_text = []
verrou = threading.Lock()
