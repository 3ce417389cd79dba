"""The pools' watchdog: a sensor that hands a free pool slot to a step Dagster left waiting for it.

Dagster 1.13's pool queue (PostgreSQL storage) can strand a step. A step asking for a slot first
checks whether one is unassigned, then enters the queue; when the last holder releases its slot
between those two statements, the release finds nobody queued and the newcomer enters unassigned.
Nothing assigns it afterwards: the step waits for ever with its slot free, and its run never ends.
`laion_assets_tests/test_pools.py` reproduces the interleaving; the deployment test hit it in CI,
where a retried shard waited ten minutes for the only `gpu` slot while nothing held it."""

import dagster as dg

from laion_assets import names


def offer_free_slots(instance: dg.DagsterInstance) -> dict[str, int]:
    """Assigns each pool's free slots to its waiting steps, by Dagster's own queue order (priority,
    then age); returns the slots handed out per pool. A free slot is one that no queued step holds,
    the very count Dagster checks when a step enters the queue."""
    storage = instance.event_log_storage
    offered = {}
    for pool in sorted(storage.get_concurrency_keys()):
        info = storage.get_concurrency_info(pool)
        free = min(info.slot_count - info.assigned_step_count, info.pending_step_count)
        for _ in range(free):
            storage.assign_pending_steps([pool])
        if free > 0:
            offered[pool] = free
    return offered


@dg.sensor(
    name=names.POOL_SLOTS_SENSOR, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING
)
def pool_slots_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    """Every 30 s: gives a free pool slot to a step waiting for it (see the module's docstring)."""
    if not context.instance.event_log_storage.supports_global_concurrency_limits:
        return dg.SkipReason("this instance's storage has no pools: nothing to watch")
    offered = offer_free_slots(context.instance)
    if not offered:
        return dg.SkipReason("no pool has both a free slot and a step waiting for one")
    summary = ", ".join(f"{count} of pool {pool}" for pool, count in offered.items())
    context.log.warning(f"handed free slots to steps Dagster's queue had left waiting: {summary}")
    return dg.SkipReason(f"handed out {summary}")
