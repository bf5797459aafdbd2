#!/bin/bash
# Measure the playbooks on a fresh lab fleet (docs/performance.md):
#   lab/measure.sh [INVENTORY_DIR] [OUT_DIR]
# e.g. lab/measure.sh lab/inventories/six-boards /tmp/six
# Replaces any running lab containers, then times site.yml at the stand-ins' first commits and
# runtime 1.2.2 (first run), the same run again (no-op), and upgrade.yml to the inventory's
# versions, saving the lab upstream's byte counters after each step in OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
INV=${1:-inventories/lab}
OUT=${2:-lab/.state/measure}
mkdir -p "$OUT"
export PATH="$PWD/.venv/bin:$PATH" ANSIBLE_CONFIG="$PWD/ansible.cfg"
UPSTREAM="http://127.0.0.1:${LAB_UPSTREAM_PORT:-18000}"

docker ps -aq --filter label=rkllm.lab=1 | xargs -r docker rm -f >/dev/null
docker ps -aq --filter name=^rkllm-lab- | xargs -r docker rm -f >/dev/null
rm -f .cache/facts/*rkllm-lab* 2>/dev/null || true
python lab/lab.py up --inventory "$INV/hosts.yml" >"$OUT/up.log" 2>&1

python - >"$OUT/first-versions.json" <<'PY'
import json, yaml
pins = yaml.safe_load(open("inventories/lab/group_vars/all/lab_pins.yml"))["lab_pins"]
print(json.dumps({"runtime_version": "1.2.2", "rkllama_version": pins["rkllama"]["commits"]["v1"],
                  "exo_version": pins["exo"]["commits"]["v1"]}))
PY

step() {  # step NAME PLAYBOOK [ARGS...]: run, time, save the counters
    local name=$1 start rc=0; shift
    start=$(date +%s)
    ansible-playbook -i "$INV" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    curl -fsS "$UPSTREAM/_lab/counters" >"$OUT/counters-$name.json"
    echo "$name: rc=$rc $(( $(date +%s) - start )) s" | tee -a "$OUT/summary.txt"
}
: >"$OUT/summary.txt"
step first playbooks/site.yml -e "@$OUT/first-versions.json"
step noop playbooks/site.yml -e "@$OUT/first-versions.json"
grep -A20 'PLAY RECAP' "$OUT/noop.log" | grep 'changed=' | tee -a "$OUT/summary.txt"
step upgrade playbooks/upgrade.yml

python - "$OUT" <<'PY' | tee -a "$OUT/summary.txt"
import json, re, sys
out = sys.argv[1]
meta = re.compile(r"/api/|/info/refs$|/HEAD$|/objects/info/")
load = lambda n: json.load(open(f"{out}/counters-{n}.json"))["paths"]
prev = {}
for name in ("first", "noop", "upgrade"):
    now = load(name)
    delta = {p: v - prev.get(p, 0) for p, v in now.items()}
    art = sum(v for p, v in delta.items() if not meta.search(p))
    md = sum(v for p, v in delta.items() if meta.search(p))
    print(f"{name}: upstream bytes: artifacts {art}, metadata {md}")
    prev = now
PY
