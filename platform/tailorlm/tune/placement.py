"""A workaround for Ray 2.60 (Ray Train V2 under Ray Tune): placement groups that a stopped
trial's TorchTrainer leaves behind are released after each trial, or the next trial waits
forever for their CPUs. Remove this module once Ray frees them itself (check with
tests/integration/test_tune_stage.py, which stops trials early with ASHA).
"""

from __future__ import annotations


def _reserves_compute(bundle: dict) -> bool:
    res = bundle.get("unit_resources", bundle)
    return any(res.get(k, 0) > 0 for k in ("CPU", "GPU"))


LIST_LIMIT = 10_000  # the State API server's maximum


def release_leaked_placement_groups(wait_s: float = 2.0) -> list[str]:
    """Remove placement groups that no actor uses, seen twice wait_s apart; returns their ids.

    When Tune stops a trial while its TorchTrainer is shutting down (Train has already stopped its
    PlacementGroupCleaner), the trainer's placement group outlives it: Ray removes a non-detached
    group only once its creator actor and its job are both gone, and the job is this sweep. Left
    there, it holds the workers' CPUs and the next trial waits forever.
    """
    import time

    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup
    from ray.util.state import list_actors, list_placement_groups

    def idle() -> set[str]:
        # only groups that reserve CPUs or GPUs (trainer workers); Tune's own trial-driver groups
        # reserve neither (see run_sweep) and are left to Tune
        # filtered on the server and with a high limit: the default (100) returned dead actors of
        # earlier trials first, so a group whose live actor fell past it looked unused
        groups = {
            g.placement_group_id
            for g in list_placement_groups(
                filters=[("state", "=", "CREATED")], detail=True, limit=LIST_LIMIT, raise_on_missing_output=False
            )
            if not g.is_detached and any(_reserves_compute(b) for b in g.bundles or [])
        }
        used = {
            a.placement_group_id
            for a in list_actors(
                filters=[("state", "!=", "DEAD")], detail=True, limit=LIST_LIMIT, raise_on_missing_output=False
            )
            if a.placement_group_id
        }
        return groups - used

    leaked = idle()
    if leaked:
        time.sleep(wait_s)
        leaked &= idle()
    for pg_id in leaked:
        ray.util.remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
    return sorted(leaked)


def cleanup_callback():
    """A Tune callback: after each trial ends, free placement groups its trainer left behind."""
    from ray.tune import Callback

    class ReleaseLeakedPlacementGroups(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            self._release()

        def on_trial_error(self, iteration, trials, trial, **info):
            self._release()

        def _release(self) -> None:
            try:
                freed = release_leaked_placement_groups()
            except Exception as exc:  # the State API is best effort; never fail a sweep over cleanup
                print(f"[tune] could not check for leaked placement groups: {exc}")
                return
            if freed:
                print(f"[tune] released {len(freed)} placement group(s) a stopped trial left behind")

    return ReleaseLeakedPlacementGroups()
