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

from dotenv import dotenv_values
from flask import Flask, Response, jsonify, request

from src import process, variables
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
    # server.py:68-84: load_dotenv(Modelfile, override=True), then os.getenv: every key goes into the
    # server's environment and stays there, so a key one Modelfile leaves out (MAX_NEW_TOKENS,
    # TEMPERATURE) keeps the value the previously loaded model's Modelfile set, and a Modelfile without
    # FROM makes the server open the previous model's file name in this directory: the runtime fails
    # to initialise and the answer is a 500, not the 400 below (which only the first load can get).
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


@app.route("/generate", methods=["POST"])
def generate():
    model = state["model"]
    if model is None:
        return jsonify({"error": "No models are currently loaded."}), 400
    # server.py:277-278: blocks until the lock is free; Request releases it (see src/process.py).
    variables.verrou.acquire()  # pylint: disable=consider-using-with
    return process.Request(model)


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

    if not args.target_platform:
        # server.py:316-317: printed at every start without the flag; the server then runs normally.
        print("\033[91mError argument not found: --target_platform\033[0m", flush=True)
    else:
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
