#!/usr/bin/env bash
# The main job on a running Ray cluster, from its head node: wait for the GPU workers, build the
# shaped dataset into object storage (every worker writes its shards there), then publish it to
# the Hub as the next immutable vN. docker/ray-cluster.yaml mounts it as ~/tsdfm/build-job.sh:
#
#   ray exec docker/ray-cluster.yaml --tmux 'TSDFM_OUT=s3://my-bucket/tsdfm/shaped-k8 \
#       TSDFM_REPO=my-org/tsdfm-shaped-k8 TSDFM_GPUS=4 bash ~/tsdfm/build-job.sh'
#
# Rerunning it resumes: committed shards in TSDFM_OUT are kept, and a version already on the
# Hub is not published twice.
#
# Settings (environment):
#   TSDFM_OUT      dataset URL or shared path (required), e.g. s3://bucket/prefix
#   TSDFM_REPO     Hub dataset repo org/name to publish to (empty: do not publish)
#   TSDFM_GPUS     GPU workers to wait for before building (default 1)
#   TSDFM_TEACHER  teacher checkpoint, dir or org/name@rev (default: the bundled one)
#   TSDFM_COMPASS  compass checkpoint (default: the bundled one)
#   TSDFM_SHARDS   number of shards (default 256)
#   TSDFM_ARGS     more `tsdfm-pipeline build` flags, e.g. "--k 8 --trajectories-per-shard 64"
#   HF_TOKEN       Hub write token for TSDFM_REPO, unless `hf auth login` stored one on the
#                  head; never put it in this file or on a command line
set -euo pipefail

: "${TSDFM_OUT:?set TSDFM_OUT to the dataset URL, e.g. s3://bucket/tsdfm/shaped-k8}"
repo="${TSDFM_REPO:-}"
model_args=()
[ -n "${TSDFM_TEACHER:-}" ] && model_args+=(--teacher "$TSDFM_TEACHER")
[ -n "${TSDFM_COMPASS:-}" ] && model_args+=(--compass "$TSDFM_COMPASS")
read -r -a extra_args <<< "${TSDFM_ARGS:-}"

if [ -n "$repo" ]; then  # a missing token or a bad repo id fails now, not after the build
    python -c 'import sys
from models.errors import TsdfmError
from pipeline.hub import check_repo_id, resolve_token
try:
    resolve_token(None, check_repo_id(sys.argv[1]))
except TsdfmError as e:
    sys.exit(f"error: {e}")' "$repo"
fi

# Ray schedules one actor per GPU it sees when the build starts: wait for all of them.
python - "${TSDFM_GPUS:-1}" <<'EOF'
import sys, time
import ray

want = float(sys.argv[1])
ray.init(address="auto", log_to_driver=False)
deadline = time.time() + 1800
while (have := ray.cluster_resources().get("GPU", 0)) < want:
    if time.time() > deadline:
        sys.exit(f"only {have:g} of {want:g} GPUs joined the Ray cluster in 30 minutes")
    print(f"waiting for GPU workers: {have:g}/{want:g}", flush=True)
    time.sleep(15)
EOF

tsdfm-pipeline build --address auto --device cuda "${model_args[@]}" \
    --shards "${TSDFM_SHARDS:-256}" --out "$TSDFM_OUT" "${extra_args[@]}"

if [ -n "$repo" ]; then
    # `publish` reads a local folder: copy the finished dataset from the object store first.
    local_copy="${TMPDIR:-/tmp}/tsdfm-publish"
    rm -rf "$local_copy"
    python -c 'import sys, fsspec
fs, path = fsspec.core.url_to_fs(sys.argv[1])
fs.get(path.rstrip("/") + "/", sys.argv[2].rstrip("/") + "/", recursive=True)' \
        "$TSDFM_OUT" "$local_copy"
    tsdfm-pipeline publish "$local_copy" --repo "$repo"
fi
