#!/usr/bin/env bash
# Train larp_jax on a Cloud TPU VM slice (one or many hosts). Run `launch/tpu_pod.sh --help`.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator-type=TYPE \
         --config=CONFIG[:ARGS] --workdir=DIR [options] [-- ARGS...]

Creates the TPU VM slice NAME (or reuses it), copies this checkout to every worker, installs
the pinned requirements.txt plus the TPU jax build ("jax[tpu]==<the jax pin>") in a venv, then
runs on every worker at once

  python -m larp_jax.main --config=CONFIG --workdir=DIR --multihost [EXTRA...]

(jax.distributed.initialize() finds the other workers by itself on a TPU VM). Each worker's
output goes to larp_logs/NAME/<hostname>.log on that worker and is copied back to --logs at the
end. Every command is printed before it runs ('+ ...').

Resume after a preemption or a crash: run the same command again. The run continues from the
latest checkpoint in the workdir. A slice in state PREEMPTED (or TERMINATED) is deleted and
created again when --spot or --preemptible is given; without either the script stops and says so.

Required:
  --name=NAME               TPU VM name
  --zone=ZONE               e.g. us-central2-b (v4), us-west4-a (v5e)
  --accelerator-type=TYPE   slice type, e.g. v4-8, v4-32, v5litepod-64, v6e-16
  --config=CONFIG           config spec relative to the checkout, e.g. configs/ucf101.py:size=L
  --workdir=DIR             run directory, the same for all workers: gs://BUCKET/PATH (the bucket
                            is mounted with gcsfuse on every worker at /gcs/BUCKET and the run
                            gets /gcs/BUCKET/PATH: larp_jax reads and writes POSIX paths), or a
                            path on a file system every worker mounts (NFS / Filestore)

Options:
  --version=RUNTIME         TPU software version (default by type: v4 tpu-ubuntu2204-base,
                            v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --project=PROJECT         passed to every gcloud command (default: gcloud's configured project)
  --spot | --preemptible    create a Spot (or legacy preemptible) slice; recreate it if preempted
  --extra='ARGS'            more arguments for larp_jax.main, split on spaces (repeatable), e.g.
                            --extra='--config.model.dtype=bfloat16 --config.model.attention_impl=chunked'
  -- ARGS...                everything after -- goes to larp_jax.main as it is (values with spaces)
  --mount-bucket=BUCKET     also mount gs://BUCKET at /gcs/BUCKET on every worker (data; repeatable)
  --repo=URL [--ref=REF]    clone URL at REF (default main) on the workers instead of copying a
                            `git archive` of this checkout's HEAD (uncommitted changes are not sent)
  --python=PYTHON           interpreter on the workers for the venv (default python3.11; installed
                            with apt when missing)
  --skip-install            do not copy the code or install anything (a rerun on a ready slice)
  --logs=DIR                local folder for the workers' logs (default launch_logs/NAME)
  --retries=N               after a failed run, check the slice again (recreating a preempted
                            one) and rerun, up to N times (default 0)
  --dry-run                 print every command and run none (no gcloud needed)
  --assume-state=STATE      with --dry-run: the state `describe` would report (default NONE: no
                            such TPU; READY, PREEMPTED, TERMINATED, STOPPED, CREATING)
  -h, --help                this text

Example (LARP-L tokenizer, global batch 128 over 16 v4 chips):
  launch/tpu_pod.sh --name=larp-v4 --zone=us-central2-b --accelerator-type=v4-32 --spot \
    --config=configs/ucf101.py:source=records --workdir=gs://my-bucket/runs/larp_l \
    --mount-bucket=my-data --extra='--config.data.path=/gcs/my-data/ucf101_records' \
    --extra='--config.model.dtype=bfloat16 --config.model.attention_impl=chunked'
EOF
}

# ---------------------------------------------------------------------------------- helpers
die() {
  echo "error: $*" >&2
  exit 2
}

quote() { # words -> one line that a shell reads back as the same words
  local out='' word q="'" qq="'\\''"
  for word in "$@"; do
    if [[ -n $word && $word =~ ^[A-Za-z0-9_./:=,+@%^-]+$ ]]; then
      out+=" $word"
    else
      out+=" '${word//$q/$qq}'"
    fi
  done
  printf '%s\n' "${out# }"
}

trace() { printf '+ %s\n' "$(quote "$@")"; }

run() { # print the command, then run it unless this is a dry run
  trace "$@"
  ((DRY_RUN)) || "$@"
}

# --------------------------------------------------------------------------------- the flags
NAME='' ZONE='' TYPE='' CONFIG='' WORKDIR='' VERSION='' PROJECT='' REPO_URL='' REF='main'
PYTHON='python3.11' LOGS='' ASSUME_STATE='NONE'
SPOT=0 PREEMPTIBLE=0 DRY_RUN=0 SKIP_INSTALL=0 RETRIES=0
EXTRA=() BUCKETS=()
while (($#)); do
  arg=$1
  shift
  case $arg in
    --) EXTRA+=("$@"); break ;;
    --*=*) key=${arg%%=*} val=${arg#*=} has_val=1 ;;
    *) key=$arg val='' has_val=0 ;;
  esac
  case $key in
    -h | --help) usage; exit 0 ;;
    --dry-run | --spot | --preemptible | --skip-install)
      ((!has_val)) || die "$key takes no value"
      case $key in
        --dry-run) DRY_RUN=1 ;;
        --spot) SPOT=1 ;;
        --preemptible) PREEMPTIBLE=1 ;;
        --skip-install) SKIP_INSTALL=1 ;;
      esac
      ;;
    --name | --zone | --accelerator-type | --config | --workdir | --version | --project | \
      --extra | --mount-bucket | --repo | --ref | --python | --logs | --retries | --assume-state)
      if ((!has_val)); then
        (($#)) || die "$key needs a value ($key=...)"
        val=$1
        shift
      fi
      [[ -n $val ]] || die "$key needs a non-empty value"
      case $key in
        --name) NAME=$val ;;
        --zone) ZONE=$val ;;
        --accelerator-type) TYPE=$val ;;
        --config) CONFIG=$val ;;
        --workdir) WORKDIR=$val ;;
        --version) VERSION=$val ;;
        --project) PROJECT=$val ;;
        --extra) read -ra words <<<"$val"; EXTRA+=("${words[@]}") ;;
        --mount-bucket) BUCKETS+=("${val#gs://}") ;;
        --repo) REPO_URL=$val ;;
        --ref) REF=$val ;;
        --python) PYTHON=$val ;;
        --logs) LOGS=$val ;;
        --retries) RETRIES=$val ;;
        --assume-state) ASSUME_STATE=$val ;;
      esac
      ;;
    *) die "unknown argument $arg (see --help)" ;;
  esac
done

for pair in name:"$NAME" zone:"$ZONE" accelerator-type:"$TYPE" config:"$CONFIG" workdir:"$WORKDIR"; do
  [[ -n ${pair#*:} ]] || die "--${pair%%:*} is required (see --help)"
done
((SPOT + PREEMPTIBLE < 2)) || die '--spot and --preemptible exclude each other'
[[ $RETRIES =~ ^[0-9]+$ ]] || die "--retries must be a number >= 0, got $RETRIES"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name=$NAME: use lower-case letters, digits and '-', starting with a letter"
[[ $TYPE =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
  die "--accelerator-type=$TYPE is not a slice type such as v4-32 or v5litepod-64"
[[ $PYTHON =~ ^[A-Za-z0-9_./-]+$ ]] || die "--python=$PYTHON is not a command name or path"
[[ $ASSUME_STATE =~ ^[A-Z_]+$ ]] || die "--assume-state=$ASSUME_STATE: use a state such as READY"
if [[ -z $VERSION ]]; then
  case $TYPE in
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) die "no default --version for $TYPE; give the TPU runtime version" ;;
  esac
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
JAX_VERSION=$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "$ROOT/requirements.txt")
[[ -n $JAX_VERSION ]] || die "$ROOT/requirements.txt has no 'jax==VERSION' line"
if [[ -z $REPO_URL && ${CONFIG%%:*} != /* && ! -f $ROOT/${CONFIG%%:*} ]]; then
  die "--config=$CONFIG: there is no file ${CONFIG%%:*} in $ROOT (the code the workers get)"
fi
LOGS=${LOGS:-launch_logs/$NAME}

[[ $WORKDIR == gs://* || $WORKDIR == /* ]] ||
  die "--workdir=$WORKDIR: give gs://BUCKET/PATH or an absolute path that every worker mounts"
# A gs:// run directory becomes the same path under the bucket's gcsfuse mount on every worker.
RUN_WORKDIR=$WORKDIR
if [[ $WORKDIR == gs://* ]]; then
  rest=${WORKDIR#gs://}
  bucket=${rest%%/*}
  [[ -n $bucket ]] || die "--workdir=$WORKDIR names no bucket"
  BUCKETS=("$bucket" "${BUCKETS[@]}")
  RUN_WORKDIR=/gcs/$rest
fi
for bucket in "${BUCKETS[@]}"; do
  [[ $bucket =~ ^[a-z0-9][-_.a-z0-9]*$ ]] || die "bucket name $bucket is not a GCS bucket name"
done

GCLOUD_ARGS=(--zone="$ZONE")
[[ -z $PROJECT ]] || GCLOUD_ARGS+=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)
VENV=larp_jax_venv # on the workers, relative to the home directory (where ssh starts)
REMOTE_LOGS=larp_logs/$NAME

on_workers() { # run one shell command line on every worker of the slice at once
  run "${TPU[@]}" ssh "$NAME" "${GCLOUD_ARGS[@]}" --worker=all --command="$1"
}

# ---------------------------------------------------------------------------- the slice
describe() { # sets STATE and SLICE_TYPE of the slice; STATE=NONE when there is none
  local query=(describe "$NAME" "${GCLOUD_ARGS[@]}" '--format=value(state,acceleratorType)') out
  trace "${TPU[@]}" "${query[@]}"
  STATE=$ASSUME_STATE SLICE_TYPE=$TYPE
  ((DRY_RUN)) && return
  out=$("${TPU[@]}" "${query[@]}" 2>/dev/null) || out=''
  read -r STATE SLICE_TYPE <<<"$out" || true
  STATE=${STATE:-NONE} SLICE_TYPE=${SLICE_TYPE:-$TYPE}
}

create() {
  local provisioning=()
  ((SPOT)) && provisioning=(--spot)
  ((PREEMPTIBLE)) && provisioning=(--preemptible)
  run "${TPU[@]}" create "$NAME" "${GCLOUD_ARGS[@]}" --accelerator-type="$TYPE" \
    --version="$VERSION" "${provisioning[@]}"
  CREATED=1 # a new slice has nothing installed yet
}

ensure_slice() { # leaves the slice READY, creating, starting or recreating it as needed
  local waited=0
  while true; do
    describe
    if [[ $STATE != NONE && $SLICE_TYPE != "$TYPE" ]]; then
      die "TPU $NAME is a $SLICE_TYPE, not a $TYPE; delete it or choose another --name"
    fi
    case $STATE in
      READY) return ;;
      NONE)
        create
        return
        ;;
      PREEMPTED | TERMINATED)
        ((SPOT || PREEMPTIBLE)) ||
          die "TPU $NAME is $STATE; pass --spot (or --preemptible) to delete and recreate it, or delete it yourself"
        echo "# TPU $NAME is $STATE: deleting and recreating it"
        run "${TPU[@]}" delete "$NAME" "${GCLOUD_ARGS[@]}" --quiet
        create
        return
        ;;
      STOPPED)
        run "${TPU[@]}" start "$NAME" "${GCLOUD_ARGS[@]}"
        return
        ;;
      CREATING | STARTING | RESTARTING | REPAIRING | PROVISIONING)
        if ((DRY_RUN)); then
          echo "# TPU $NAME is $STATE: would poll describe every 30 s until READY"
          return
        fi
        ((waited < 3600)) || die "TPU $NAME still $STATE after an hour"
        echo "# TPU $NAME is $STATE; waiting"
        sleep 30
        waited=$((waited + 30))
        ;;
      *) die "TPU $NAME is $STATE; wait for it or delete it" ;;
    esac
  done
}

# --------------------------------------------------------------------- code and packages
ship_code() {
  if [[ -n $REPO_URL ]]; then
    on_workers "rm -rf larp_jax && git clone --quiet $(quote "$REPO_URL") larp_jax && git -C larp_jax checkout --quiet $(quote "$REF")"
    return
  fi
  local archive=${TMPDIR:-/tmp}/larp_jax-$NAME.tar.gz
  if ((!DRY_RUN)) && [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no) ]]; then
    echo "# warning: uncommitted changes in $ROOT are not sent (git archive HEAD)" >&2
  fi
  run git -C "$ROOT" archive --format=tar.gz --prefix=larp_jax/ -o "$archive" HEAD
  run "${TPU[@]}" scp "$archive" "$NAME:larp_jax.tar.gz" "${GCLOUD_ARGS[@]}" --worker=all
  on_workers 'rm -rf larp_jax && tar -xzf larp_jax.tar.gz && rm larp_jax.tar.gz'
}

install_packages() {
  local py=$PYTHON get_python=''
  if [[ $py != */* ]]; then # a bare name: apt installs it where it is missing
    get_python="command -v $py >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q $py $py-venv; }; "
  fi
  on_workers "${get_python}[ -x $VENV/bin/python ] || $py -m venv $VENV; \
$VENV/bin/python -m pip install -q -r larp_jax/requirements.txt -e ./larp_jax && \
$VENV/bin/python -m pip install -q 'jax[tpu]==$JAX_VERSION'"
}

mount_buckets() {
  local bucket
  ((${#BUCKETS[@]})) || return 0
  # shellcheck disable=SC2016  # $(lsb_release -cs) expands on the workers
  on_workers 'command -v gcsfuse >/dev/null || { echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }'
  for bucket in "${BUCKETS[@]}"; do
    # --rename-dir-limit: Orbax finishes a checkpoint by renaming its temporary directory.
    on_workers "mountpoint -q /gcs/$bucket || { sudo mkdir -p /gcs/$bucket && sudo chown \"\$USER\" /gcs/$bucket && gcsfuse --implicit-dirs --rename-dir-limit=1000000 $bucket /gcs/$bucket; }"
  done
}

# ------------------------------------------------------------------------------- the run
train_on_workers() { # the training command on every worker; its output teed to a log there
  local main # runs in larp_jax/, so the venv is one level up
  main=$(quote "../$VENV/bin/python" -m larp_jax.main --config="$CONFIG" \
    --workdir="$RUN_WORKDIR" --multihost "${EXTRA[@]}")
  on_workers "set -o pipefail; mkdir -p $REMOTE_LOGS && cd larp_jax && $main 2>&1 | tee -a ../$REMOTE_LOGS/\$(hostname).log"
}

collect_logs() {
  run mkdir -p "$LOGS"
  run "${TPU[@]}" scp "$NAME:$REMOTE_LOGS/*" "$LOGS/" "${GCLOUD_ARGS[@]}" --worker=all
}

attempt=0
while true; do
  CREATED=0
  ensure_slice
  if ((!SKIP_INSTALL || CREATED)); then
    ship_code
    install_packages
  fi
  mount_buckets
  status=0
  train_on_workers || status=$?
  collect_logs || echo "# warning: could not copy the workers' logs to $LOGS" >&2
  ((status)) || exit 0
  ((attempt < RETRIES)) || exit "$status"
  attempt=$((attempt + 1))
  echo "# the run failed (exit $status); retry $attempt of $RETRIES"
done
