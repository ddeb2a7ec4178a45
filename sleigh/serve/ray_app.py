"""`sleigh serve` on Ray Serve: the same app (sleigh/serve/app.py) in N replicas, each loading its own
model, behind Ray's HTTP proxy. Works on a local Ray cluster and on a multi-node one unchanged (the
package path must exist on every node that runs a replica: a shared folder or the same copy).

    sleigh serve --model PKG --ray --replicas 2                        # starts (or joins) Ray itself
    serve run sleigh.serve.ray_app:app_builder model=PKG replicas=2    # Ray's own CLI, same app

Each replica runs one generation at a time and lets `max_queue` more wait (503 beyond); Ray routes
each request to the replica with fewer ongoing requests. Autoscaling (min/max replicas, target
ongoing requests per replica) replaces the fixed count when `max_replicas` is given.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from sleigh.errors import SleighError
from sleigh.serve import SHUTDOWN_TIMEOUT_S, check_shutdown_timeout
from sleigh.serve.app import ServeSettings


@dataclass(frozen=True)
class Scaling:
    replicas: int = 1
    min_replicas: int | None = None  # with max_replicas: autoscaling
    max_replicas: int | None = None
    target_ongoing_requests: float = 1.0  # per replica: one running generation keeps a replica busy
    replica_cpus: float = 1.0  # Ray CPUs reserved by each replica (its ONNX Runtime threads: --threads)
    shutdown_timeout: float = SHUTDOWN_TIMEOUT_S  # a replica stopped: its answers under way may finish for this long

    def __post_init__(self):
        if self.replicas < 1:
            raise SleighError("--replicas", f"got {self.replicas}", "an integer >= 1")
        if self.max_replicas is not None and not 1 <= (self.min_replicas or 1) <= self.max_replicas:
            raise SleighError("--min-replicas/--max-replicas", f"got {self.min_replicas}/{self.max_replicas}",
                              "1 <= min <= max")
        if self.target_ongoing_requests <= 0 or self.replica_cpus < 0:
            raise SleighError("--target-ongoing-requests/--replica-cpus", "got a non-positive value", "values > 0")
        check_shutdown_timeout(self.shutdown_timeout)

    @property
    def first_replicas(self) -> int:
        """The replicas Ray starts at once: the fixed count, or autoscaling's floor."""
        return self.replicas if self.max_replicas is None else self.min_replicas or 1

    def check_cpus(self, cluster_cpus: float) -> None:
        """The replicas started at once must fit the cluster's CPUs: Ray would wait for them forever
        (saying so every 30 s), and `sleigh serve` would never say it serves."""
        n = self.first_replicas
        need = n * self.replica_cpus
        if need > cluster_cpus:
            flag = "--replicas" if self.max_replicas is None else "--min-replicas"
            raise SleighError(f"{flag} {n} --replica-cpus {self.replica_cpus:g}",
                              f"{n} replica{'s' if n != 1 else ''} of {self.replica_cpus:g} CPUs need {need:g}; "
                              f"this Ray cluster has {cluster_cpus:g}",
                              "fewer replicas, or a smaller --replica-cpus (a replica's --threads are its own)")

    def deployment_options(self, settings: ServeSettings) -> dict:
        options = {
            # one running + max_queue waiting per replica; the replica itself answers 503 past that
            "max_ongoing_requests": settings.max_queue + 2,
            "ray_actor_options": {"num_cpus": self.replica_cpus},
            "graceful_shutdown_timeout_s": self.shutdown_timeout,
        }
        if self.max_replicas is not None:
            options["autoscaling_config"] = {"min_replicas": self.first_replicas,
                                             "max_replicas": self.max_replicas,
                                             "target_ongoing_requests": self.target_ongoing_requests}
        else:
            options["num_replicas"] = self.replicas
        return options


def build_app(settings: ServeSettings, scaling: Scaling = Scaling()):
    """A Ray Serve application (bind()-ed deployment) of `sleigh serve`'s app."""
    from ray import serve

    def build_asgi_app():  # runs in each replica, which loads its own model
        from sleigh.serve.app import create_app, load_worker

        return create_app(settings, load_worker(settings))

    ingress = serve.ingress(build_asgi_app)()
    return serve.deployment(ingress, name="sleigh", **scaling.deployment_options(settings)).bind()


def app_builder(args: dict):
    """For `serve run sleigh.serve.ray_app:app_builder model=PKG [replicas=2] [max_queue=16] ...`: keys
    are ServeSettings' and Scaling's field names."""
    settings_keys = {f.name: f.type for f in fields(ServeSettings)}
    scaling_keys = {f.name: f.type for f in fields(Scaling)}
    unknown = sorted(set(args) - set(settings_keys) - set(scaling_keys))
    if unknown or "model" not in args:
        raise SleighError("serve run args", f"unknown {unknown}" if unknown else "no model=PKG",
                          f"model=PKG and any of {sorted((set(settings_keys) | set(scaling_keys)) - {'model'})}")
    settings = ServeSettings(**{k: _convert(k, v) for k, v in args.items() if k in settings_keys})
    scaling = Scaling(**{k: _convert(k, v) for k, v in args.items() if k in scaling_keys})
    return build_app(settings, scaling)


_INT = {"threads", "max_queue", "max_body_bytes", "max_image_pixels", "default_max_tokens", "retry_after_s",
        "replicas", "min_replicas", "max_replicas"}
_FLOAT = {"target_ongoing_requests", "replica_cpus", "shutdown_timeout"}
_PATH = {"model", "allow_local_files"}


def _convert(key: str, value):
    try:
        if key in _INT:
            return int(value)
        if key in _FLOAT:
            return float(value)
        if key in _PATH:
            return Path(value)
    except ValueError:
        raise SleighError(f"serve run {key}={value}", "not a number", "a number") from None
    return value
