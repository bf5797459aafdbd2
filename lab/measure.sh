#!/bin/bash
# Measure the playbooks on a fresh lab fleet (docs/performance.md). Two modes:
#
#   lab/measure.sh [INVENTORY_DIR] [OUT_DIR]
#       This checkout alone, e.g. lab/measure.sh lab/inventories/six-boards /tmp/six: times site.yml
#       at the stand-ins' first commits and runtime 1.2.2 (first run), the same run again (no-op), and
#       upgrade.yml to the inventory's versions, saving the lab upstream's byte counters after each step.
#
#   lab/measure.sh --compare [OLD_COMMIT] [OUT_DIR]
#       An old commit (default 9d32307, the last one before the converged fast path) against this
#       checkout, on this machine in one invocation: for each fleet size in MEASURE_SIZES (default
#       "6 3": lab/inventories/six-boards, inventories/lab), fresh containers, site.yml (first run)
#       and site.yml again (no-op), old then new. Writes OUT_DIR/table.md (times, changed counts,
#       ratios). The old commit is checked out as a git worktree in /tmp with links to this
#       checkout's .venv and lab state; both trees use this checkout's lab pins (the upstream serves
#       this checkout's stand-ins). The 3-board fleet goes last, so the lab is left as `make lab`
#       leaves it (provisioned by this checkout).
#
# Both modes replace any running lab containers: run them under the lab lock
# (flock /tmp/rkllm-lab.lock lab/measure.sh ...).
set -euo pipefail
cd "$(dirname "$0")/.."
HERE=$PWD
export PATH="$HERE/.venv/bin:$PATH"
UPSTREAM="http://127.0.0.1:${LAB_UPSTREAM_PORT:-18000}"

fresh_lab() {  # fresh_lab INVENTORY_DIR LOG: replace the lab containers with a fresh fleet
    docker ps -aq --filter label=rkllm.lab=1 | xargs -r docker rm -f >/dev/null
    docker ps -aq --filter name=^rkllm-lab- | xargs -r docker rm -f >/dev/null
    rm -f "$HERE"/.cache/facts/*rkllm-lab* 2>/dev/null || true
    python lab/lab.py up --inventory "$1/hosts.yml" >"$2" 2>&1
}

if [ "${1:-}" = "--compare" ]; then
    OLD=${2:-9d32307}
    OUT=${3:-lab/.state/measure-compare}
    mkdir -p "$OUT"
    OUT=$(cd "$OUT" && pwd)
    OLD_SHA=$(git rev-parse --short "$OLD^{commit}")
    WT=/tmp/rkllm-measure-$OLD_SHA
    if [ ! -d "$WT" ]; then
        git worktree add --detach "$WT" "$OLD_SHA" >/dev/null
    fi
    ln -sfn "$HERE/.venv" "$WT/.venv"
    mkdir -p "$WT/lab"
    ln -sfn "$HERE/lab/.state" "$WT/lab/.state"
    # Lab data, not code: the upstream serves this checkout's stand-ins under these pins.
    cp "$HERE/inventories/lab/group_vars/all/lab_pins.yml" "$WT/inventories/lab/group_vars/all/lab_pins.yml"
    NEW_DESC="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- roles plugins playbooks || echo '+changes')"
    : >"$OUT/runs.tsv"
    run() {  # run TREE LABEL SIZE STEP INVENTORY
        local tree=$1 label=$2 size=$3 step=$4 inv=$5 start rc=0 secs changed
        start=$(date +%s)
        (cd "$tree" && ANSIBLE_CONFIG="$tree/ansible.cfg" ANSIBLE_CALLBACKS_ENABLED=ansible.builtin.profile_tasks \
            "$tree/.venv/bin/ansible-playbook" -i "$inv" playbooks/site.yml) >"$OUT/$label-$size-$step.log" 2>&1 || rc=$?
        secs=$(( $(date +%s) - start ))
        changed=$( (grep -A30 'PLAY RECAP' "$OUT/$label-$size-$step.log" || true) | grep -o 'changed=[0-9]*' \
                  | awk -F= '{s += $2} END {print s + 0}')
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$size" "$step" "$secs" "$rc" "${changed:-?}" | tee -a "$OUT/runs.tsv"
    }
    for size in ${MEASURE_SIZES:-6 3}; do
        case $size in
            3) inv=inventories/lab ;;
            6) inv=lab/inventories/six-boards ;;
            *) echo "MEASURE_SIZES: 3 or 6, not $size" >&2; exit 2 ;;
        esac
        for label in old new; do
            tree=$HERE; [ $label = old ] && tree=$WT
            fresh_lab "$inv" "$OUT/up-$label-$size.log"
            run "$tree" $label "$size" first "$inv"
            run "$tree" $label "$size" noop "$inv"
        done
    done
    python3 - "$OUT" "$OLD_SHA" "$NEW_DESC" <<'PY' | tee "$OUT/table.md"
import sys
out, old, new = sys.argv[1:4]
rows = {}
for line in open(f"{out}/runs.tsv"):
    label, size, step, secs, rc, changed = line.rstrip("\n").split("\t")
    rows[(label, size, step)] = (int(secs), rc, changed)
fmt = lambda s: f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"
print(f"| boards | run | old ({old}) | new ({new}) | new / old |")
print("|---|---|---|---|---|")
for size in sorted({k[1] for k in rows}, key=int):
    for step, name in (("first", "first run (fresh containers)"), ("noop", "no-op re-run")):
        o, n = rows.get(("old", size, step)), rows.get(("new", size, step))
        cell = lambda r: "" if r is None else f"{fmt(r[0])} (changed={r[2]}{'' if r[1] == '0' else ', rc=' + r[1]})"
        ratio = f"{n[0] / o[0]:.2f}" if o and n and o[0] else ""
        print(f"| {size} + gateway | {name} | {cell(o)} | {cell(n)} | {ratio} |")
for label in ("old", "new"):
    a, b = rows.get((label, "3", "noop")), rows.get((label, "6", "noop"))
    if a and b and a[0]:
        print(f"\n{label}: no-op with 6 boards / no-op with 3 boards = {b[0] / a[0]:.2f}")
PY
    exit 0
fi

INV=${1:-inventories/lab}
OUT=${2:-lab/.state/measure}
mkdir -p "$OUT"
export ANSIBLE_CONFIG="$HERE/ansible.cfg"
fresh_lab "$INV" "$OUT/up.log"

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
