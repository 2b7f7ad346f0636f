"""Quiet by default: Ray's console lines that say nothing actionable are filtered (not with -v),
and Ray's other warnings still reach the console."""

from __future__ import annotations

import logging


def test_ray_noise_is_filtered_from_rays_console_handlers_only_when_not_verbose():
    import ray.data  # noqa: F401 - its logger and handlers exist once imported

    from embedjob.cluster import _quiet_ray_console, _RayNoise

    handlers = logging.getLogger("ray").handlers + logging.getLogger("ray.data").handlers
    assert handlers, "Ray configures console handlers at import"
    for h in handlers:
        h.filters = [f for f in h.filters if not isinstance(f, _RayNoise)]
    _quiet_ray_console(verbose=True)
    assert not any(isinstance(f, _RayNoise) for h in handlers for f in h.filters)
    _quiet_ray_console(verbose=False)
    _quiet_ray_console(verbose=False)  # idempotent: one filter per handler
    for h in handlers:
        assert sum(isinstance(f, _RayNoise) for f in h.filters) == 1

    def passes(msg: str) -> bool:
        rec = logging.LogRecord("ray.data", logging.WARNING, __file__, 1, msg, None, None)
        return all(f.filter(rec) for f in handlers[0].filters)

    assert not passes("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled")
    assert not passes("Starting execution of Dataset dataset_1. Full logs are in /tmp/ray/x")
    assert passes("The autoscaler cannot place 1 actor: no node holds GPU: 1")
