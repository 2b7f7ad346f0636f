"""Where the job runs: starting or joining Ray, and sizing the encoder actor pool from the cluster.

``init_ray(ray_cfg)`` joins the cluster at ``ray.address`` / ``RAY_ADDRESS`` or starts a local Ray;
``plan_encoder(encode, resources)`` turns ``encode.*`` settings and ``ray.cluster_resources()`` into
the actor pool's device, size, CPUs and threads.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any, Optional

from pydantic import Field

from embedjob._config_base import Section
from embedjob.errors import JobError
from embedjob.models import resolve_model_path
from embedjob.ray_errors import raise_injected
from embedjob.stages.encode.busy import FEED_BOUND, PoolPlan, feed_plan

if TYPE_CHECKING:
    from embedjob.stages.encode.config import EncodeConfig

logger = logging.getLogger(__name__)


class RayConfig(Section):
    address: Optional[str] = Field(
        None,
        description="Ray cluster to join; null = RAY_ADDRESS if set (as `ray job submit` sets it), "
        "else a local Ray started in-process.",
    )
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs of the in-process local Ray; null = all.")
    num_gpus: Optional[int] = Field(None, ge=0, description="GPUs of the in-process local Ray; null = detect.")


LOCAL_HEALTH_CHECK_ENV = "RAY_health_check_failure_threshold"  # Ray's setting, read by the GCS it starts
LOCAL_HEALTH_CHECK_FAILURES = "20"


def init_ray(ray_cfg: RayConfig) -> dict[str, Any]:
    """Join the cluster at ``ray.address`` / ``RAY_ADDRESS``, else start a local Ray in-process."""
    import ray

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS")
    raise_injected("init")  # test-only: Ray failing to start (EMBEDJOB_DEBUG_RAY_FAILURE)
    if ray.is_initialized():
        mode = "existing"
    elif address:
        ray.init(address=address, log_to_driver=True)
        mode = f"cluster {address}"
    else:
        verbose = logging.getLogger("embedjob").isEnabledFor(logging.DEBUG)
        _quiet_ray_console(verbose)
        # one node, started here: a raylet late with its heartbeats is one busy with this job's own work
        # (seen at load 30 on 2 cores), and Ray marking it dead ends the driver (exit 1) with nothing
        # gained. Ray's default gives up after 5 missed checks 3 s apart; locally, wait 20.
        os.environ.setdefault(LOCAL_HEALTH_CHECK_ENV, LOCAL_HEALTH_CHECK_FAILURES)
        # the workers' own output (Ray Train's reports, library warnings) stays in Ray's log files
        # unless -v: embedjob's driver says what each stage does
        ray.init(num_cpus=ray_cfg.num_cpus, num_gpus=ray_cfg.num_gpus, include_dashboard=False,
                 log_to_driver=verbose,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
        mode = "local"
    res = ray.cluster_resources()
    logger.info("ray: %s, %d CPUs, %d GPUs, %d nodes", mode, int(res.get("CPU", 0)), int(res.get("GPU", 0)),
                len([n for n in ray.nodes() if n.get("Alive")]))
    return {"mode": mode, "resources": {k: v for k, v in res.items() if not k.startswith("node:")}}


# Ray's console lines that say nothing a user of the default job can act on (Ray's log files keep them).
RAY_NOISE = ("Token authentication is enabled", "Started a local Ray instance", "Progress bars disabled",
             "Starting execution of Dataset", "Execution plan of Dataset", "execution finished in",
             "Registered dataset logger", "Full logs are in")


class _RayNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in RAY_NOISE)


def _quiet_ray_console(verbose: bool) -> None:
    """Drop :data:`RAY_NOISE` from the console handlers of Ray's and Ray Data's loggers (not -v)."""
    if verbose:
        return
    import ray.data  # noqa: F401 - configures Ray Data's own logger and handlers

    for name in ("ray", "ray.data"):
        for h in logging.getLogger(name).handlers:
            if not any(isinstance(f, _RayNoise) for f in h.filters):
                h.addFilter(_RayNoise())


def plan_encoder(e: EncodeConfig, resources: dict[str, float], *, static: bool) -> PoolPlan:
    """Device, actor count, CPUs and threads of the encoder actor pool, from config and cluster.

    ``resources`` is ``ray.cluster_resources()``: one GPU actor per GPU, else CPU actors (with a
    log line saying so). ``encode.resources`` (custom Ray resources per actor) caps the actor
    count at what the cluster holds, unless ``encode.actors`` is set (an autoscaler may add the
    nodes that hold them). ``static``: the encoder also pools static word vectors (``static.enabled``)."""
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if e.device == "cuda" and gpus == 0:
        if not e.actors:
            raise JobError("encode.device=cuda but the Ray cluster has no GPUs (set encode.device=auto or cpu, "
                           "or encode.actors=N to wait for an autoscaler to add N GPU workers)")
        logger.warning("encode: the cluster has no GPUs yet; asking for %d GPU actor(s), to be placed when the "
                       "autoscaler adds GPU nodes", e.actors)
    device = "cuda" if (e.device == "auto" and gpus > 0) or e.device == "cuda" else "cpu"
    if e.actors:
        actors = e.actors
    elif device == "cuda":
        actors = gpus * e.actors_per_gpu
    else:
        actors = max(1, int(cpus // max(e.cpus_per_actor, 1) // 2) or 1)
    if e.resources:
        fit = min(int(resources.get(k, 0) // v) if v > 0 else actors for k, v in e.resources.items())
        if fit == 0 and not e.actors:
            raise JobError(f"encode.resources={dict(e.resources)} asks for resources the Ray cluster does not hold "
                           f"(its custom resources: {_custom_resources(resources)}); start nodes with "
                           "`ray start --resources`, or set encode.actors to wait for an autoscaler to add them")
        if fit < actors and e.actors:
            logger.warning("encode: encode.resources=%s fits %d of the %d actors (encode.actors) now; the rest "
                           "wait for nodes that hold them", dict(e.resources), fit, actors)
        elif fit < actors:
            actors = fit
    if device == "cuda":
        share = 1 if e.actors_per_gpu == 1 else round(1.0 / e.actors_per_gpu, 6)
        plan = PoolPlan(device="cuda", actors=actors, num_gpus=share, num_cpus=e.cpus_per_actor,
                        threads=e.threads_per_actor or 2)
        if e.actors_per_gpu == 1:
            logger.info("encode: %d GPU actor(s), one per GPU (num_gpus=1)", actors)
        else:
            logger.info("encode: %d GPU actor(s), %d per GPU (num_gpus=%g each, encode.actors_per_gpu)",
                        actors, e.actors_per_gpu, share)
    else:
        threads = e.threads_per_actor or max(1, cpus // actors)
        num_cpus = e.cpus_per_actor
        if actors * num_cpus > cpus - 1:  # leave a CPU for the read/preprocess/write tasks
            num_cpus = max(0.1, (cpus - 1) / actors) if cpus > 1 else 0.5
            logger.info("encode: %d CPU(s) in the cluster: each encoder actor reserves %.2f CPU so the read "
                        "and write tasks can run beside it", cpus, num_cpus)
        plan = PoolPlan(device="cpu", actors=actors, num_gpus=0, num_cpus=num_cpus, threads=threads)
        if e.device == "auto":
            logger.info("encode: no GPUs in the cluster, encoding with %d CPU actor(s) x %d threads", actors, threads)
        else:
            logger.info("encode: %d CPU actor(s) x %d threads (encode.device=cpu)", actors, threads)
    if e.resources:
        plan.resources = dict(e.resources)
        logger.info("encode: each encoder actor asks for Ray resources %s", dict(e.resources))
    plan.preprocess_concurrency = e.preprocess_concurrency
    if device == "cuda":
        _plan_feed(e.model, static, plan, max(gpus, -(-actors // e.actors_per_gpu)), cpus, e.actors_per_gpu)
    elif e.actors_per_gpu > 1:
        logger.info("encode: encode.actors_per_gpu=%d applies to GPU actors only; this pool runs on CPUs",
                    e.actors_per_gpu)
    return plan


def _plan_feed(model: str, static: bool, plan: PoolPlan, gpus: int, cpus: int, actors_per_gpu: int = 1) -> None:
    """CPU preprocessing per GPU from the measured rates (busy.feed_plan), logged; sets the
    preprocess tasks at once unless ``encode.preprocess_concurrency`` does."""
    try:
        with open(os.path.join(resolve_model_path(model), "config.json")) as f:
            hidden = json.load(f).get("hidden_size")
    except (OSError, ValueError):
        hidden = None
    feed = feed_plan(gpus, cpus, hidden, static=static, actors_per_gpu=actors_per_gpu)
    plan.feed = feed
    if plan.preprocess_concurrency is None:
        plan.preprocess_concurrency = feed["preprocess_concurrency"]
    logger.info("encode: feeding %d GPU(s) at ~%.1fM tokens/s each takes ~%.1f CPUs per GPU (%.1f CPU-s per million "
                "tokens); the cluster has %.1f per GPU (expected encoder busy ~%d%%); %d preprocess tasks at once",
                gpus, feed["gpu_tokens_per_s"] / 1e6, feed["cpus_per_gpu_needed"], feed["cpu_s_per_mtok"],
                feed["cpus_per_gpu"], 100 * feed["expected_busy"], plan.preprocess_concurrency)
    if feed["cpus_per_gpu"] < FEED_BOUND * feed["cpus_per_gpu_needed"]:
        logger.warning("encode: %.1f CPUs per GPU is below the ~%.1f that keep a GPU busy: add CPUs to the GPU nodes "
                       "(or CPU-only nodes for preprocessing)", feed["cpus_per_gpu"], feed["cpus_per_gpu_needed"])
    if feed["actors_feed_tokens_per_s"] < FEED_BOUND * feed["gpu_tokens_per_s"]:
        # an estimate from CPU measurements (bench feed), not yet checked on a GPU host: said, not warned
        logger.info("encode: %d encoder actor(s) per GPU hand it at most ~%.1fM tokens/s (each actor's own thread "
                    "spends ~%.2f CPU-s per million tokens around the model, as `embedjob bench feed` measured it "
                    "on CPUs), below the GPU's ~%.1fM: encode.actors_per_gpu=%d would keep it busy",
                    actors_per_gpu, feed["actors_feed_tokens_per_s"] / 1e6, feed["actor_cpu_s_per_mtok"],
                    feed["gpu_tokens_per_s"] / 1e6, feed["actors_per_gpu_needed"])


def _custom_resources(resources: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in resources.items()
            if not k.startswith("node:") and k not in ("CPU", "GPU", "memory", "object_store_memory")}
