"""Deploying the classifier (cluster/serve.py) on a running Ray cluster, the way `serve deploy` does.

`deploy(ServeConfig(checkpoint=...))` turns the config into one application of a Serve
config file (`application_config`) and applies it through Serve's REST API on the Ray
dashboard -- the mechanism `serve deploy` and KubeRay's RayService use -- so a change of
the batching settings or the replica count reaches the running replicas (reconfigure(),
more or fewer replicas) instead of replacing them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import ray
from ray import serve

from cluster.serve import (
    DEPLOY_ONLY_FIELDS, DEPLOYMENT_NAME, IMPORT_PATH, LIVE_FIELDS, SCALING_FIELDS, ServeConfig,
    check_pin, resolved, scaling_options,
)
from resnet_dist.inference import checkpoint_id


def application_config(cfg: ServeConfig, runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
    """`cfg` as one application of a Serve config file (ray.serve.schema.ServeApplicationSchema).

    Serve gives a config-file application the code version of its import path, runtime_env
    and args, and applies the `deployments` options to running replicas when that version is
    unchanged. So everything that needs new replicas is in `args` -- with the checkpoint's
    content id (`checkpoint_id`), so that a new file at the same path is a new version, and a
    replica that finds another file there refuses to start -- and the batching
    settings (user_config, reconfigure()) and replica counts are deployment options.
    """
    cfg = pinned(resolved(cfg))
    outside_args = LIVE_FIELDS + SCALING_FIELDS + DEPLOY_ONLY_FIELDS
    args = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in outside_args}
    return {
        "name": cfg.name,
        "route_prefix": cfg.route_prefix,
        "import_path": IMPORT_PATH,
        "runtime_env": dict(runtime_env or {}),
        "args": args,
        "deployments": [{"name": DEPLOYMENT_NAME, "user_config": cfg.user_config(), **scaling_options(cfg)}],
    }


def pinned(cfg: ServeConfig) -> ServeConfig:
    """`cfg` pinned to the content id of its checkpoint file as it is now (ConfigError if `cfg`
    already names another id: the file changed since that id was taken)."""
    found = checkpoint_id(cfg.checkpoint)
    check_pin(cfg, found)
    return dataclasses.replace(cfg, checkpoint_id=found)


def deploy(cfg: ServeConfig, timeout_s: float | None = None) -> str:
    """Run (or update in place) the application on the current Ray connection; returns its base URL.

    It is applied the way `serve deploy` applies a config file, through Serve's REST API
    on the Ray dashboard: Serve's public way to change a running application's
    user_config or replica count without replacing its replicas (`serve.run` gives every
    call a new code version). The other applications deployed by config stay as they are.
    Raises RuntimeError when Serve reports the deployment failed, TimeoutError after
    `timeout_s` (None: wait as long as Serve keeps trying, as `serve.run` does).

    The checkpoint must be readable on every node that runs a replica: the same path there, or a
    URI (s3://, gs://; resnet_dist.storage).
    """
    # Replicas of a config-file app get this job's runtime_env only if the config names it
    # (serve.run adds it by itself): a submitted job's working_dir holds this code.
    app_config = application_config(cfg, ray.get_runtime_context().runtime_env if ray.is_initialized() else None)
    # Started from this driver (a no-op when Serve runs), not by the REST call from the
    # dashboard, so the controller and the processes it starts can import this code as the
    # replicas of serve.run could.
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s})
    http = apply_application(app_config, timeout_s)
    host = "127.0.0.1" if http["host"] in ("0.0.0.0", "::", "") else http["host"]
    return f"http://{host}:{http['port']}{cfg.route_prefix.rstrip('/')}"


def apply_application(app_config: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
    """Apply one application of a Serve config file (`application_config`, or one written by hand
    as in a RayService) beside the others running, and wait until it runs; returns Serve's http_options."""
    name = app_config["name"]
    client = _rest_client()
    details = client.get_serve_details()
    before = details.get("applications", {}).get(name, {}).get("last_deployed_time_s")
    others = [app["deployed_app_config"] for other, app in details.get("applications", {}).items()
              if other != name and app.get("deployed_app_config")]
    # The running proxies' settings, not cfg's: HTTP options are cluster-wide, fixed by the
    # first serve.start, and a config that differs only earns a warning in the dashboard log.
    kept = {k: details[k] for k in ("proxy_location", "http_options", "grpc_options", "target_capacity")
            if details.get(k) is not None}
    client.deploy_applications({**kept, "applications": [*others, app_config]})
    _wait_running(name, before, timeout_s)
    return details["http_options"]


def _rest_client():
    """A client of Serve's REST API on this cluster's dashboard (token auth as the `serve` CLI does it)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    # Already connected: ray.init only hands back the connection's context.
    url = ray.init(ignore_reinit_error=True).dashboard_url
    if not url:
        raise RuntimeError("deploying needs the Ray dashboard (Serve's REST API), and this cluster runs none")
    return ServeSubmissionClient(url if "://" in url else f"http://{url}")


def _wait_running(name: str, before: float | None, timeout_s: float | None, poll_s: float = 0.2) -> None:
    """Until application `name` runs the config just applied (its deploy time is not `before`)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(name)
        if app is not None and app.last_deployed_time_s != before:
            if app.status == "RUNNING":
                return
            if app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                # The application's message only names the failed deployment; its own says why.
                why = [f"{d}: {o.message}" for d, o in app.deployments.items() if o.message]
                raise RuntimeError(f"Serve application {name!r} {app.status.value}: "
                                   + " ".join([app.message, *why]).strip())
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"Serve application {name!r} not running after {timeout_s} s "
                               f"({app.status if app else 'not deployed'})")
        time.sleep(poll_s)
