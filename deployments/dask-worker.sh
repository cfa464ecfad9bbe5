#!/usr/bin/env bash
# Start Dask workers for sanitator audits on this machine, attached to a scheduler.
#
#   deployments/dask-worker.sh tcp://SCHEDULER:8786 [PROCESSES]        # CPU workers
#   deployments/dask-worker.sh tcp://SCHEDULER:8786 --gpu              # one worker per GPU
#
# CPU: PROCESSES worker processes (default 2) with one task thread each, and
# cores / PROCESSES torch threads per process: more threads than cores slows PyTorch down
# fifty-fold on small machines (docs/pipeline.md). GPU: dask-cuda's `dask cuda worker`
# (one process per visible GPU) declaring the GPU resource that GPU audits ask for.
# Every worker needs the same environment as the flow (this checkout installed, same lock).
set -euo pipefail
scheduler="${1:?usage: $0 tcp://SCHEDULER:8786 [PROCESSES|--gpu]}"
mode="${2:-2}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
if [ "$mode" = "--gpu" ]; then
  # dask-cuda is not in the CPU lock: pip install dask-cuda on GPU hosts
  exec dask cuda worker "$scheduler" --resources "GPU=1" --nthreads 1
fi
cores=$(nproc)
threads=$(( cores / mode )); [ "$threads" -ge 1 ] || threads=1
export OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads"
# as on the LocalCluster `sanitator audit` starts (flows/dask_jobs.py): glibc keeps its own
# malloc thresholds (Dask's MALLOC_TRIM_THRESHOLD_ made scans ~30 % slower)
export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON="{'MALLOC_TRIM_THRESHOLD_': None}"
exec dask worker "$scheduler" --nworkers "$mode" --nthreads 1 --name "$(hostname)"
