"""Where steps run: the executor a deployment chooses, and the pod resources of the heavy assets when
each step is a Kubernetes pod. The definitions stay the same; the environment picks."""

import os

import dagster as dg

EXECUTOR_ENV = "LAION_ASSETS_EXECUTOR"
EXECUTORS = ("multiprocess", "in_process", "k8s")


def pod_resources(requests: dict[str, str], limits: dict[str, str]) -> dict[str, dict]:
    """The `dagster-k8s/config` op tag that sizes an asset's pod under `k8s_job_executor`."""
    return {
        "dagster-k8s/config": {"container_config": {"resources": {"requests": requests, "limits": limits}}}
    }


# A download step: requests on an event loop, images decoded in a process per core; a 10,000-row shard
# peaks under 1 GB. Its CPU limit is what the step counts its cores by (`usable_cores`, the container's
# cpu.max): with a request alone it saw the whole node, and started a worker per node core under the
# pod's memory limit.
DOWNLOAD_POD = pod_resources({"cpu": "2", "memory": "2Gi"}, {"cpu": "2", "memory": "4Gi"})
# An embedding step: one GPU, and CPU cores to decode ahead of it.
GPU_POD = pod_resources({"cpu": "4", "memory": "8Gi"}, {"memory": "16Gi", "nvidia.com/gpu": "1"})


def executor_from_env() -> dg.ExecutorDefinition:
    """$LAION_ASSETS_EXECUTOR: `in_process` (the default: one process per run), `multiprocess`
    (Dagster's own default: a process per step), or `k8s` (a pod per step, sized by the tags above;
    needs dagster-k8s and the K8sRunLauncher).

    A shard's steps form a chain, so a process per step runs nothing in parallel; it only adds a Python
    start, the imports and the model load to every step: 40 s per run against 7 s in one process
    (bench/run_overhead.py)."""
    name = os.environ.get(EXECUTOR_ENV) or "in_process"
    if name not in EXECUTORS:
        raise ValueError(f"{EXECUTOR_ENV}={name!r} is not one of {EXECUTORS}")
    if name == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    return dg.in_process_executor if name == "in_process" else dg.multiprocess_executor
