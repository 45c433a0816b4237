#!/usr/bin/env bash
# make container-test: the soundline image end to end, the way docker-compose.yml wires it.
#   1. build the image (podman, local debian:bookworm-slim, --pull=never) and report its size
#   2. a temporary git + DVC checkout: this repo's pipeline/, serving/, dvc.yaml, the reduced
#      default corpus (8 speakers x 2 sessions x 5 digits, built by espeak-ng inside the image)
#      and reduced params (as tests/integration/test_compare.py)
#   3. an `mlflow server` container (SQLite + proxied artifacts on a folder)
#   4. the image's default command (soundline-repro: dvc repro, validate_raw .. package) in the
#      checkout, MLFLOW_TRACKING_URI pointing at that server
#   5. `bentoml serve` of the Bento the package stage built, from the shared BentoML home;
#      wait for /readyz, POST a real recording to /classify, check the answer
# The sandbox's podman runs every container in the host network namespace (netns=host), so the
# containers talk over 127.0.0.1 on free ports instead of a compose network; nothing listens
# beyond loopback. Writes benchmarks/results/image_size.json; prints image_size_gb=X last.
# Not part of `make test`: it needs podman and takes several minutes (README "Containers").
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
SANDBOX_TOOL=${CONTAINER_SANDBOX:-$REPO/../shared/tools/container-sandbox.sh}
IMAGE=${SOUNDLINE_IMAGE:-soundline}
NICE=${CONTAINER_TEST_NICE:-nice -n 19}   # the machine is shared with timing benchmarks
READY_TIMEOUT_S=${READY_TIMEOUT_S:-300}
ID=soundline-ct-$$
START=$(date +%s)

fail() { echo "container-test: FAILED: $*" >&2; exit 1; }
step() { echo "container-test: [$(( $(date +%s) - START )) s] $*"; }
podman() { "$SANDBOX_TOOL" podman "$@"; }

[ -x "$SANDBOX_TOOL" ] || fail "$SANDBOX_TOOL not found (set CONTAINER_SANDBOX to container-sandbox.sh)"
command -v curl >/dev/null || fail "curl is needed on the host"
command -v python3 >/dev/null || fail "python3 is needed on the host (JSON checks)"
T=$(mktemp -d "${TMPDIR:-/tmp}/soundline-ct.XXXXXX")

cleanup() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    for c in mlflow service; do
      if podman container exists "$ID-$c" 2>/dev/null; then
        echo "---- last lines of the $c container's log ----" >&2
        podman logs --tail 40 "$ID-$c" >&2 2>&1 || true
      fi
    done
  fi
  for c in service pipeline mlflow prep; do podman rm -f -t 5 "$ID-$c" >/dev/null 2>&1 || true; done
  if [ "$rc" != 0 ] && [ -n "${CONTAINER_TEST_KEEP:-}" ]; then echo "kept $T" >&2; else rm -rf "$T"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- 1. image -------------------------------------------------------------------------------
step "container-sandbox setup (podman + local debian:bookworm-slim)"
$NICE "$SANDBOX_TOOL" setup >/dev/null || fail "container-sandbox.sh setup failed"
step "podman build -t $IMAGE (cached layers are reused)"
b0=$(date +%s)
$NICE "$SANDBOX_TOOL" podman build --pull=never -t "$IMAGE" "$REPO" > "$T/build.log" 2>&1 \
  || { tail -40 "$T/build.log" >&2; fail "podman build failed (log above)"; }
BUILD_S=$(( $(date +%s) - b0 ))
SIZE=$(podman image inspect "$IMAGE" --format '{{.Size}}')
step "image $IMAGE: $SIZE bytes, build step ${BUILD_S} s"

# The image runs as soundline (uid 1000). Rootful podman (root here): hand the temporary
# checkout to uid 1000. Rootless podman: map the invoking user onto uid 1000 instead.
if [ "$(id -u)" = 0 ]; then USERNS=(); else USERNS=(--userns=keep-id:uid=1000,gid=1000); fi
run() { podman run "${USERNS[@]}" --network host "$@"; }

# --- 2. a reduced checkout -------------------------------------------------------------------
step "temporary checkout with the reduced corpus in $T/repo"
mkdir -p "$T/repo" "$T/mlflow" "$T/bentoml"
for f in dvc.yaml params.yaml .gitignore .dvcignore; do cp "$REPO/$f" "$T/repo/"; done
cp -r "$REPO/pipeline" "$REPO/serving" "$T/repo/"
find "$T/repo" -name __pycache__ -prune -exec rm -rf {} +
[ "$(id -u)" = 0 ] && chown -R 1000:1000 "$T"

# Inside the image: espeak-ng corpus, params, git + DVC (this also proves git and dvc work in
# a mounted checkout). Reduced params: tests/reduced_params.yaml, as the `make compare` test.
mkdir -p "$T/prep"
cp "$REPO/tests/reduced_params.yaml" "$T/prep/"
cat > "$T/prep/prep.sh" <<'EOF'
set -eu
python -m pipeline.data.corpus --out data/raw --speakers 8 --digits 5
python - <<'PY'
import yaml
reduced = yaml.safe_load(open("/prep/reduced_params.yaml"))
params = yaml.safe_load(open("params.yaml"))
def update(base, new):
    for k, v in new.items():
        update(base[k], v) if isinstance(v, dict) else base.__setitem__(k, v)
update(params, reduced)
yaml.safe_dump(params, open("params.yaml", "w"), sort_keys=False)
PY
git init -q && git config user.email ct@soundline.invalid && git config user.name "container test"
dvc init -q && dvc config core.analytics false
dvc add -q data/raw
# the repo keeps the recordings' pointer at the root as data.dvc (path: data/raw)
sed 's|path: raw$|path: data/raw|' data/raw.dvc > data.dvc && rm data/raw.dvc
dvc status data.dvc
git add -A && git commit -q -m "reduced soundline"
EOF
run --rm --name "$ID-prep" -v "$T/repo:/work" -v "$T/prep:/prep:ro" "$IMAGE" sh /prep/prep.sh > "$T/prep.log" 2>&1 \
  || { cat "$T/prep.log" >&2; fail "preparing the reduced checkout inside the image failed"; }
n_wav=$(find "$T/repo/data/raw" -name '*.wav' | wc -l)
[ "$n_wav" = 80 ] || fail "expected 80 recordings in the reduced corpus, found $n_wav"
grep -q "up to date" "$T/prep.log" || { cat "$T/prep.log" >&2; fail "data.dvc does not match data/raw"; }

# --- 3. MLflow tracking server -----------------------------------------------------------------
MLFLOW_PORT=$(free_port)
MLFLOW_URI=http://127.0.0.1:$MLFLOW_PORT
step "mlflow server container on $MLFLOW_URI"
run -d --name "$ID-mlflow" -v "$T/mlflow:/mlflow" "$IMAGE" \
  mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
  --backend-store-uri sqlite:////mlflow/mlflow.db --serve-artifacts --artifacts-destination /mlflow/artifacts \
  >/dev/null || fail "could not start the mlflow container"
for _ in $(seq 120); do
  curl -fsS "$MLFLOW_URI/health" >/dev/null 2>&1 && break
  [ "$(podman inspect -f '{{.State.Running}}' "$ID-mlflow")" = true ] || fail "mlflow server exited"
  sleep 1
done
curl -fsS "$MLFLOW_URI/health" >/dev/null || fail "mlflow server not healthy after 120 s"

# --- 4. dvc repro in the container -------------------------------------------------------------
step "pipeline container: soundline-repro (dvc repro) with MLFLOW_TRACKING_URI=$MLFLOW_URI"
r0=$(date +%s)
$NICE "$SANDBOX_TOOL" podman run "${USERNS[@]}" --network host --rm --name "$ID-pipeline" \
  -v "$T/repo:/work" -v "$T/bentoml:/bentoml" -e MLFLOW_TRACKING_URI="$MLFLOW_URI" "$IMAGE" \
  > "$T/repro.log" 2>&1 || { tail -60 "$T/repro.log" >&2; fail "dvc repro in the container failed (log above)"; }
REPRO_S=$(( $(date +%s) - r0 ))
for stage in validate_raw featurize validate_features pretrain filter train evaluate register package; do
  grep -q "Running stage '$stage'" "$T/repro.log" || { tail -40 "$T/repro.log" >&2; fail "stage $stage did not run"; }
done
[ -f "$T/repo/reports/package.json" ] || fail "the package stage wrote no reports/package.json"
BENTO=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["bento_tag"])' "$T/repo/reports/package.json")
python3 - "$T/repo/reports/evaluate_run.json" "$MLFLOW_URI" <<'PY' || fail "the stages did not track to the MLflow server"
import json, sys
run = json.load(open(sys.argv[1]))
assert run["tracking_uri"] == sys.argv[2], run
PY
step "dvc repro: all 9 stages in ${REPRO_S} s; Bento $BENTO"

# --- 5. the service ---------------------------------------------------------------------------
SERVE_PORT=$(free_port)
URL=http://127.0.0.1:$SERVE_PORT
step "service container: bentoml serve $BENTO on $URL"
run -d --name "$ID-service" -v "$T/bentoml:/bentoml" "$IMAGE" \
  bentoml serve "$BENTO" --host 127.0.0.1 --port "$SERVE_PORT" >/dev/null || fail "could not start the service container"
deadline=$(( $(date +%s) + READY_TIMEOUT_S ))
until curl -fsS "$URL/readyz" >/dev/null 2>&1; do
  [ "$(podman inspect -f '{{.State.Running}}' "$ID-service")" = true ] || fail "bentoml serve exited"
  [ "$(date +%s)" -lt "$deadline" ] || fail "service not ready after $READY_TIMEOUT_S s"
  sleep 1
done
# sed reads its whole input: `sort | head -1` can kill sort with SIGPIPE, which pipefail reports
WAV=$(find "$T/repo/data/raw" -name '*.wav' | sort | sed -n 1p)
step "POST /classify with ${WAV#"$T/repo/"}"
curl -fsS -F "audio=@$WAV;type=audio/wav" "$URL/classify" > "$T/classify.json" \
  || fail "POST /classify failed: $(curl -sS -F "audio=@$WAV" "$URL/classify" 2>&1 | cut -c1-500)"
python3 - "$T/classify.json" "$T/repo/reports/package.json" <<'PY' || fail "unexpected /classify answer: $(head -c 500 "$T/classify.json")"
import json, sys
body, package = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
assert body["label"] in ("good", "bad"), body
assert body["model"] == package["mlflow_model"] and body["model"].startswith("soundline-quality-"), body  # one entry per task
assert str(body["version"]) == str(package["mlflow_version"]) and body["alias"] == "champion", body
probs = body["probabilities"]
assert set(probs) == {"good", "bad"} and abs(sum(probs.values()) - 1) < 1e-4, body
print("classify:", json.dumps({k: body[k] for k in ("label", "model", "version", "alias", "probabilities")}))
PY

# --- report -------------------------------------------------------------------------------------
TOTAL_S=$(( $(date +%s) - START ))
mkdir -p "$REPO/benchmarks/results"
python3 - "$REPO/benchmarks/results/image_size.json" "$SIZE" "$BUILD_S" "$REPRO_S" "$TOTAL_S" "$IMAGE" <<'PY'
import json, os, sys
out, size, build_s, repro_s, total_s, image = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:6]), sys.argv[6]
gb = round(size / 1e9, 2)
record = {"image_size_gb": gb, "image_size_bytes": size, "image": image,
          "base": "debian:bookworm-slim (container-sandbox.sh stand-in: debootstrap minbase)",
          "torch": "2.13.0+cpu", "goal_gb": 2.0,
          "build_step_seconds": build_s, "container_repro_seconds": repro_s, "container_test_seconds": total_s,
          "corpus": "reduced default corpus (8 speakers x 2 sessions x 5 digits), 2 epochs",
          "cores": os.cpu_count()}
tmp = out + ".tmp"
with open(tmp, "w") as f:
    f.write(json.dumps(record, indent=2) + "\n")
os.replace(tmp, out)
PY
step "PASSED in ${TOTAL_S} s (build ${BUILD_S} s, dvc repro ${REPRO_S} s)"
echo "image_size_gb=$(python3 -c "print(round($SIZE / 1e9, 2))")"
