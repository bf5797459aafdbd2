"""Tokenizer loading as transformers does it from the Hugging Face cache (rkllm.fleet lab stand-in).

The fork calls AutoTokenizer.from_pretrained(HUGGINGFACE_PATH) on every request. Offline
(HF_HUB_OFFLINE=1) that needs the files in the cache; online it would go to huggingface.co,
which the lab (like an air-gapped board) can't reach.
"""

import json
import os

REQUIRED = ("tokenizer.json", "tokenizer_config.json")


def hub_cache():
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def offline():
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def load(repo_id):
    """Return the tokenizer config of repo_id, or raise OSError like transformers."""
    repo_dir = os.path.join(hub_cache(), "models--" + repo_id.replace("/", "--"))
    try:
        with open(os.path.join(repo_dir, "refs", "main"), encoding="utf-8") as f:
            revision = f.read().strip()
        snapshot = os.path.join(repo_dir, "snapshots", revision)
        if all(os.path.isfile(os.path.join(snapshot, name)) for name in REQUIRED):
            with open(os.path.join(snapshot, "tokenizer_config.json"), encoding="utf-8") as f:
                return json.load(f)
    except (OSError, ValueError):
        pass
    if offline():
        raise OSError(
            f"We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the cached "
            f"files. Check your internet connection or see how to run the library in offline mode at "
            f"'https://huggingface.co/docs/transformers/installation#offline-mode'. ({repo_id})")
    raise OSError(
        f"(MaxRetryError(\"HTTPSConnectionPool(host='huggingface.co', port=443): Max retries exceeded with url: "
        f"/{repo_id}/resolve/main/tokenizer_config.json (Caused by NameResolutionError: Failed to resolve "
        f"'huggingface.co')\"), '(Request ID: lab)')")


def count_tokens(messages):
    """A stand-in for len(apply_chat_template(...)): about four characters a token."""
    return sum(1 + len(str(m.get("content", ""))) // 4 for m in messages)
