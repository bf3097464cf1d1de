#!/usr/bin/env bash
# torchrun -> `python -m pipeline train` on this node; run the same line on every node for a multi-node job.
#
#   launch/torchrun.sh [launcher options] --config CONFIG [key=value ...]
#
# Launcher options (everything else goes to `python -m pipeline train` unchanged):
#   --nnodes N               nodes in the job (default 1: `torchrun --standalone`)
#   --nproc-per-node G       ranks on this node (default: the GPUs nvidia-smi lists, else 1)
#   --rdzv-endpoint H:P      c10d rendezvous host:port, needed with --nnodes > 1 (default $MASTER_ADDR:$MASTER_PORT,
#                            port 29500 if unset); any node's address works, the first node's is customary
#   --rdzv-id ID             job id shared by all nodes (default $SLURM_JOB_ID, else "pipeline")
#   --max-restarts R         torchrun restarts the whole worker group up to R times after a failure; with
#                            train.resume=auto every restart continues from the newest checkpoint (default 0)
#
# Stopping: SIGTERM or SIGUSR1 (SLURM's --signal warning) sent to this script (or to its whole process group)
# reaches the ranks through torchrun; they finish the step, write a checkpoint and exit 75 (SIGINT and SIGHUP
# are passed on too, and stop the ranks at once).
# torchrun reports any stopped worker as a failure (exit 1), so when this script was signalled and torchrun
# ends non-zero it exits 75 (EX_TEMPFAIL: incomplete, rerun to resume) for a scheduler to requeue.
# PIPELINE_SHUTDOWN_TIMEOUT (default 300 s) is how long torchrun waits for that checkpoint before SIGKILL.
set -uo pipefail
PREEMPTED=75

NNODES=1
NPROC=""
ENDPOINT=""
RDZV_ID="${SLURM_JOB_ID:-pipeline}"
MAX_RESTARTS=0
TRAIN_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --nnodes) NNODES="$2"; shift 2 ;;
        --nnodes=*) NNODES="${1#*=}"; shift ;;
        --nproc-per-node|--nproc_per_node) NPROC="$2"; shift 2 ;;
        --nproc-per-node=*|--nproc_per_node=*) NPROC="${1#*=}"; shift ;;
        --rdzv-endpoint|--rdzv_endpoint) ENDPOINT="$2"; shift 2 ;;
        --rdzv-endpoint=*|--rdzv_endpoint=*) ENDPOINT="${1#*=}"; shift ;;
        --rdzv-id|--rdzv_id) RDZV_ID="$2"; shift 2 ;;
        --rdzv-id=*|--rdzv_id=*) RDZV_ID="${1#*=}"; shift ;;
        --max-restarts|--max_restarts) MAX_RESTARTS="$2"; shift 2 ;;
        --max-restarts=*|--max_restarts=*) MAX_RESTARTS="${1#*=}"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) TRAIN_ARGS+=("$1"); shift ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PIPELINE_PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"

GPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
if [ -z "$NPROC" ]; then
    NPROC=$(( GPUS > 0 ? GPUS : 1 ))
fi
if [ "${GPUS:-0}" -eq 0 ]; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"  # no GPU: DeepSpeed on the CPU with gloo
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"

CMD=("$PY" -m torch.distributed.run --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS"
     --signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
     --shutdown-timeout "${PIPELINE_SHUTDOWN_TIMEOUT:-300}")
if [ "$NNODES" = 1 ] && [ -z "$ENDPOINT" ]; then
    CMD+=(--standalone)
else
    if [ -z "$ENDPOINT" ]; then
        [ -n "${MASTER_ADDR:-}" ] || { echo "error: --nnodes $NNODES needs --rdzv-endpoint HOST:PORT (or MASTER_ADDR)" >&2; exit 2; }
        ENDPOINT="$MASTER_ADDR:${MASTER_PORT:-29500}"
    fi
    CMD+=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$ENDPOINT" --rdzv-id "$RDZV_ID")
fi
CMD+=(-m pipeline train "${TRAIN_ARGS[@]}")

cd "$REPO"
SIGNALLED=""
CHILD=""
forward() {
    SIGNALLED="$1"
    echo "[torchrun.sh] SIG$1: asking the ranks to checkpoint and stop" >&2
    [ -n "$CHILD" ] && kill -s "$1" "$CHILD" 2>/dev/null
}
for sig in TERM USR1 INT HUP; do
    trap "forward $sig" "$sig"
done

"${CMD[@]}" &
CHILD=$!
# a trapped signal interrupts `wait` while torchrun still runs: wait again until it is gone, then read its status
# (bash keeps the exit status of a finished background job for a later `wait`)
while kill -0 "$CHILD" 2>/dev/null; do
    wait "$CHILD"
done
wait "$CHILD"
RC=$?
if [ -n "$SIGNALLED" ] && [ "$RC" -ne 0 ]; then
    exit "$PREEMPTED"
fi
exit "$RC"
