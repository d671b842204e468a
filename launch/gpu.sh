#!/usr/bin/env bash
# Train larp_jax on one machine with all (or some) of its GPUs. Run `launch/gpu.sh --help`.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu.sh --config=CONFIG[:ARGS] --workdir=DIR [options] [-- ARGS...]

Runs, in the root of this checkout (relative paths are relative to it), one process that drives every visible GPU (jax sees all
local GPUs; config.mesh lays them out):

  python -m larp_jax.main --config=CONFIG --workdir=DIR [EXTRA...]

Every command is printed before it runs ('+ ...'). Resume after a crash or a kill: run the same
command again; the run continues from the latest checkpoint in DIR (SIGTERM or one Ctrl-C saves
a checkpoint before exiting).

Required:
  --config=CONFIG        config spec relative to the checkout, e.g. configs/ucf101.py:size=L
  --workdir=DIR          run directory

Options:
  --install              first install requirements.txt and the CUDA jax build
                         ("jax[cuda12]==<the jax pin of requirements.txt>") with this Python
  --cuda=12              CUDA major version of that jax build (default 12)
  --python=PYTHON        interpreter (default python3; e.g. a venv's bin/python)
  --gpus=0,1,...         only these GPUs (CUDA_VISIBLE_DEVICES); default: all
  --extra='ARGS'         more arguments for larp_jax.main, split on spaces (repeatable), e.g.
                         --extra='--config.model.dtype=bfloat16 --config.mesh.fsdp=8'
  -- ARGS...             everything after -- goes to larp_jax.main as it is
  --dry-run              print every command and run none
  -h, --help             this text

Example (LARP-L tokenizer on 8 GPUs, global batch 128 = 16 per GPU):
  launch/gpu.sh --install --config=configs/ucf101.py:source=records --workdir=runs/larp_l \
    --extra='--config.data.path=/data/ucf101_records --config.model.dtype=bfloat16' \
    --extra='--config.model.attention_impl=dot_product_attention --config.model.remat=full'
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
CONFIG='' WORKDIR='' PYTHON='python3' CUDA='12' GPUS=''
DRY_RUN=0 INSTALL=0
EXTRA=()
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
    --dry-run | --install)
      ((!has_val)) || die "$key takes no value"
      if [[ $key == --dry-run ]]; then DRY_RUN=1; else INSTALL=1; fi
      ;;
    --config | --workdir | --python | --cuda | --gpus | --extra)
      if ((!has_val)); then
        (($#)) || die "$key needs a value ($key=...)"
        val=$1
        shift
      fi
      [[ -n $val ]] || die "$key needs a non-empty value"
      case $key in
        --config) CONFIG=$val ;;
        --workdir) WORKDIR=$val ;;
        --python) PYTHON=$val ;;
        --cuda) CUDA=$val ;;
        --gpus) GPUS=$val ;;
        --extra) read -ra words <<<"$val"; EXTRA+=("${words[@]}") ;;
      esac
      ;;
    *) die "unknown argument $arg (see --help)" ;;
  esac
done

[[ -n $CONFIG ]] || die '--config is required (see --help)'
[[ -n $WORKDIR ]] || die '--workdir is required (see --help)'
[[ $CUDA =~ ^[0-9]+$ ]] || die "--cuda=$CUDA: give the CUDA major version, e.g. 12"
[[ -z $GPUS || $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus=$GPUS: give GPU indices, e.g. 0,1,2,3"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
JAX_VERSION=$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "$ROOT/requirements.txt")
[[ -n $JAX_VERSION ]] || die "$ROOT/requirements.txt has no 'jax==VERSION' line"
config_file=${CONFIG%%:*}
[[ $config_file == /* ]] || config_file=$ROOT/$config_file
[[ -f $config_file ]] || die "--config=$CONFIG: there is no file $config_file"

# ------------------------------------------------------------------------------- the run
run cd "$ROOT"
if ((INSTALL)); then
  run "$PYTHON" -m pip install -r requirements.txt -e .
  run "$PYTHON" -m pip install "jax[cuda$CUDA]==$JAX_VERSION"
fi
ENV=()
[[ -z $GPUS ]] || ENV=(env CUDA_VISIBLE_DEVICES="$GPUS")
run "${ENV[@]}" "$PYTHON" -m larp_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}"
