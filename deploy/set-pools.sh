#!/usr/bin/env bash
# Sets the named pool limits of a deployment's instance (its PostgreSQL storage; a SQLite instance takes
# them too), and turns off the legacy automation pause that the UI's badge reads (below).
# Named limits are instance state, not dagster.yaml keys in Dagster 1.13: run this once after the
# instance's database exists, and again whenever the cluster changes size. It needs Dagster and the
# instance, not laion_assets: on Kubernetes it runs in the daemon's pod (Dagster's own image), read
# from stdin: kubectl exec -i deploy/dagster-daemon -- bash -s < deploy/set-pools.sh
#   GPU_POOL_LIMIT       steps of the gpu pool at once (clip_embeddings, quality_scores, recaptions): GPUs (1)
#   DOWNLOAD_POOL_LIMIT  shards downloading at once, so a cluster does not flood one site (default 4)
set -euo pipefail
: "${DAGSTER_HOME:?set DAGSTER_HOME to the folder holding deploy/dagster.yaml}"
dagster instance concurrency set gpu "${GPU_POOL_LIMIT:-1}"
dagster instance concurrency set download "${DOWNLOAD_POOL_LIMIT:-4}"
dagster instance concurrency get --all
# And the pause switch of Dagster's pre-sensor automation daemon, on in a new instance, off: the UI's
# "Auto-materialize off" badge reads it, though this project's automation is a sensor it does not stop.
python -c 'import dagster as dg; from dagster._daemon.asset_daemon import set_auto_materialize_paused
with dg.DagsterInstance.get() as instance: set_auto_materialize_paused(instance, False)'
echo "the UI's automation badge: on (the automation sensor follows the assets)"
