"""What a run survived: Ray nodes lost while it encoded, blocks retried, out-of-memory splits.

The encode stage records these in ``stats/encode.json`` and the manifest (``stages.encode``):

* ``lost_nodes`` — Ray nodes alive when encoding started and dead when it ended (id, address and
  Ray's reason), e.g. a spot node reclaimed mid-run; the blocks they held were run again elsewhere;
* ``retried_blocks`` — encoder calls started more than once (an actor or its node died under
  them); each block still counts once in the output (exactly-once commits, ``commits.py``);
* ``oom`` — out-of-memory figures of the encoder actors that met one (``stages/encode/oom.py``):
  the lowest token budget they went on with, batches split, documents that never fit.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def alive_nodes() -> dict[str, str]:
    """Node id -> address of the Ray nodes alive now ({} when Ray cannot say)."""
    import ray

    try:
        return {n["NodeID"]: n.get("NodeManagerAddress", "") for n in ray.nodes() if n.get("Alive")}
    except Exception as e:  # noqa: BLE001 - bookkeeping only
        logger.debug("ray.nodes() failed: %s", e)
        return {}


def lost_nodes(before: dict[str, str]) -> list[dict[str, Any]]:
    """The nodes of ``before`` (:func:`alive_nodes`) that are dead now, with Ray's reason."""
    import ray

    if not before:
        return []
    try:
        nodes = {n["NodeID"]: n for n in ray.nodes()}
    except Exception as e:  # noqa: BLE001 - bookkeeping only
        logger.debug("ray.nodes() failed: %s", e)
        return []
    lost = []
    for node_id, address in sorted(before.items()):
        n = nodes.get(node_id)
        if n is not None and not n.get("Alive"):
            lost.append({"node_id": node_id, "address": address,
                         "reason": n.get("DeathReasonMessage") or n.get("DeathReason") or "dead"})
    return lost


def fault_stats(counter: Any, nodes_before: dict[str, str]) -> dict[str, Any]:
    """``lost_nodes``, ``retried_blocks`` and ``oom`` of the encode stage (see the module's doc)."""
    import ray

    found: dict[str, Any] = {"retried_blocks": 0, "oom": {}}
    if counter is not None:
        try:
            found = ray.get(counter.faults.remote(), timeout=120)
        except Exception as e:  # noqa: BLE001 - a counter lost with its node: the counts are unknown
            logger.warning("encode: the fault counts were lost (%s: %s)", type(e).__name__, str(e).splitlines()[0][:200])
            found = {"retried_blocks": None, "oom": {}}
    stats: dict[str, Any] = {"lost_nodes": lost_nodes(nodes_before), "retried_blocks": found["retried_blocks"]}
    per_actor = list(found["oom"].values())
    if per_actor:
        stats["oom"] = {"actors": len(per_actor),
                        "ooms": sum(a["ooms"] for a in per_actor),
                        "retried_batches": sum(a["retried_batches"] for a in per_actor),
                        "unfit_documents": sum(a["unfit_documents"] for a in per_actor),
                        "configured_batch_tokens": max(a["configured_batch_tokens"] for a in per_actor),
                        "batch_tokens": min(a["batch_tokens"] for a in per_actor)}
    if stats["lost_nodes"]:
        logger.warning("encode: %d Ray node(s) lost during the run (%s); %s block(s) were run again",
                       len(stats["lost_nodes"]), ", ".join(n["address"] or n["node_id"] for n in stats["lost_nodes"]),
                       stats["retried_blocks"])
    return stats
