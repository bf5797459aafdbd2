"""rkllama lab stand-in: the fork's server.py, imitated for the rkllm.fleet lab. Not rkllama.

Start: python server.py --port 8080 [--target_platform rk3588|rk3576]
"""

import argparse
import configparser
import json
import os
import resource
import shutil
import subprocess
import threading
import time

from dotenv import dotenv_values
from flask import Flask, Response, jsonify, request

from src import tokenizer
from src.runtime import Model  # loads ~/RKLLAMA/lib/librkllmrt.so now, as the fork does

HOME = os.path.expanduser("~/RKLLAMA")
MODELS = os.path.join(HOME, "models")
CONFIG_FILE = os.path.join(HOME, "rkllama.ini")
HERE = os.path.dirname(os.path.abspath(__file__))


def lab_build():
    try:
        with open(os.path.join(HERE, "lab_build.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"version": "dev", "fault": None}


BUILD = lab_build()
app = Flask(__name__)
state = {"model": None, "name": None}
busy = threading.Lock()
SYSTEM = "Tu es un assistant artificiel."  # the fork's default system prompt (Modelfile SYSTEM is ignored)


@app.route("/", methods=["GET"])
def welcome():
    return jsonify({"message": "Welcome to RKLLama !", "github": "https://github.com/notpunhnox/rkllama",
                    "lab_build": BUILD.get("version")}), 200


@app.route("/models", methods=["GET"])
def list_models():
    if not os.path.isdir(MODELS):
        return jsonify({"error": "Le dossier ~/RKLLAMA/models est introuvable."}), 500
    for loose in [f for f in os.listdir(MODELS) if f.endswith(".rkllm")]:
        target = os.path.join(MODELS, os.path.splitext(loose)[0])
        os.makedirs(target, exist_ok=True)
        shutil.move(os.path.join(MODELS, loose), os.path.join(target, loose))
    names = [d for d in sorted(os.listdir(MODELS))
             if os.path.isdir(os.path.join(MODELS, d)) and any(f.endswith(".rkllm") for f in os.listdir(os.path.join(MODELS, d)))]
    return jsonify({"models": names}), 200


@app.route("/load_model", methods=["POST"])
def load_model():
    if state["model"] is not None:
        return jsonify({"error": "A model is already loaded. Please unload it first."}), 400
    data = request.get_json(silent=True) or {}
    if "model_name" not in data:
        return jsonify({"error": "Please enter the name of the model to be loaded."}), 400
    name = data["model_name"]
    model_dir = os.path.join(MODELS, name)
    if not os.path.exists(model_dir):
        return jsonify({"error": f"Model directory '{name}' not found."}), 400
    modelfile = os.path.join(model_dir, "Modelfile")
    if not os.path.exists(modelfile):
        return jsonify({"error": f"Modelfile not found in '{name}' directory."}), 400
    # The fork does load_dotenv(Modelfile, override=True) and reads os.getenv: every key goes into the
    # server's environment and stays there, so a key one Modelfile leaves out (MAX_NEW_TOKENS,
    # TEMPERATURE) keeps the value the previously loaded model's Modelfile set.
    for key, value in dotenv_values(modelfile).items():
        if value is not None:
            os.environ[key] = value
    from_value, hf_path = os.getenv("FROM"), os.getenv("HUGGINGFACE_PATH")
    if not from_value or not hf_path:
        return jsonify({"error": "FROM or HUGGINGFACE_PATH not defined in Modelfile."}), 400
    # A runtime failure is an uncaught exception in the fork: Flask answers its HTML 500 page.
    model = Model(os.path.join(model_dir, from_value), int(os.getenv("MAX_NEW_TOKENS", "2048")),
                  float(os.getenv("TEMPERATURE", "0.8")), fault=BUILD.get("fault"))
    model.huggingface_path = hf_path
    state["model"], state["name"] = model, name
    return jsonify({"message": f"Model {name} loaded successfully."}), 200


@app.route("/unload_model", methods=["POST"])
def unload_model():
    if state["model"] is None:
        return jsonify({"error": "No models are currently loaded."}), 400
    state["model"], state["name"] = None, None
    return jsonify({"message": "Model successfully unloaded!"}), 200


@app.route("/current_model", methods=["GET"])
def current_model():
    if state["name"]:
        return jsonify({"model_name": state["name"]}), 200
    return jsonify({"error": "No models are currently loaded."}), 404


def _chunk(content, count, prompt_tokens, finish, tps):
    return {"id": "rkllm_chat", "object": "rkllm_chat", "created": None,
            "choices": [{"role": "assistant", "content": content, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": count,
                      "tokens_per_second": tps, "total_tokens": prompt_tokens + count}}


@app.route("/generate", methods=["POST"])
def generate():
    model = state["model"]
    if model is None:
        return jsonify({"error": "No models are currently loaded."}), 400
    data = request.get_json(silent=True) or {}
    if "messages" not in data:
        return jsonify({"status": "error", "message": "Données JSON invalides !"}), 400
    config = tokenizer.load(model.huggingface_path)  # every request, as the fork does; raises => HTML 500
    # The fork puts its own system prompt first whenever the chat template allows a system role, then
    # raises ValueError (=> HTML 500) when two neighbouring messages have the same role: so a request
    # that starts with its own system message fails on such models, and so does user, user.
    prompt = data["messages"]
    if "raise_exception('System role not supported')" not in (config.get("chat_template") or ""):
        prompt = [{"role": "system", "content": SYSTEM}] + prompt
    for before, after in zip(prompt, prompt[1:]):
        if before.get("role") == after.get("role"):
            raise ValueError("Les rôles doivent alterner entre 'user' et 'assistant'.")
    prompt_tokens = tokenizer.count_tokens(prompt)
    busy.acquire()  # pylint: disable=consider-using-with  (released when the generation ends)
    start = time.time()
    worker = model.start(prompt_tokens)
    threading.Thread(target=lambda: (worker.join(), busy.release()), daemon=True).start()

    def tokens():
        # Whatever an abandoned stream left unread comes out first: the fork's shared buffer.
        while worker.is_alive() or model.pending:
            for token in model.take():
                yield token
            time.sleep(0.01)

    if not data.get("stream"):
        text, count = "", 0
        for token in tokens():
            text += token
            count += 1
        elapsed = max(time.time() - start, 1e-6)
        return jsonify(_chunk(text, count, prompt_tokens, "stop", count / elapsed)), 200

    def stream():
        count = 0
        for token in tokens():
            count += 1
            elapsed = max(time.time() - start, 1e-6)
            # The fork computes "stop" from a status its callback never writes (the callback assigns a
            # module global of its own), so every stream chunk, the last one too, has finish_reason null;
            # a client knows the stream ended only when the connection closes.
            yield json.dumps(_chunk(token, count, prompt_tokens, None, count / elapsed)) + "\n\n"

    return Response(stream(), content_type="text/plain")


@app.route("/pull", methods=["POST"])
def pull():
    def progress():
        yield "Error: (MaxRetryError(\"HTTPSConnectionPool(host='huggingface.co', port=443): Max retries exceeded\"))\n"
    return Response(progress(), content_type="text/plain")


@app.route("/rm", methods=["DELETE"])
def rm_model():
    # The fork reads an undefined name here and answers 500.
    raise NameError("name 'response' is not defined")


def main():
    parser = argparse.ArgumentParser(description="RKLLM server initialization with configurable options.")
    parser.add_argument("--target_platform", type=str, help="Target platform: rk3588/rk3576.")
    parser.add_argument("--port", type=str, help="Default port: 8080")
    args = parser.parse_args()
    if BUILD.get("fault") == "no_start":
        raise RuntimeError("lab build fault: this build does not start")

    config = configparser.ConfigParser()
    config.read(CONFIG_FILE)
    if "server" not in config:
        config["server"] = {"port": "8080"}
    if args.port:
        config["server"]["port"] = args.port
        with open(CONFIG_FILE, "w", encoding="utf-8") as f:
            config.write(f)
    port = config["server"].get("port", "8080")

    if args.target_platform:
        script = os.path.join(HOME, "lib", f"fix_freq_{args.target_platform}.sh")
        try:
            subprocess.run(["sudo", "bash", script], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            pass  # no sudo: the fork carries on quietly

    demand = int(os.environ.get("RKLLM_LAB_NOFILE_DEMAND", "102400"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (demand, demand))  # raises (and the server dies) when not allowed

    print(f"Start the API at http://localhost:{port}", flush=True)
    app.run(host="0.0.0.0", port=int(port), threaded=True, debug=False)


if __name__ == "__main__":
    main()
