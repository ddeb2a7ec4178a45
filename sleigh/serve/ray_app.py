"""`sleigh serve` on Ray Serve: the same app (sleigh/serve/app.py) in N replicas, each loading its own
model, behind Ray's HTTP proxy. Works on a local Ray cluster and on a multi-node one unchanged (the
package path must exist on every node that runs a replica: a shared folder or the same copy).

    sleigh serve --model PKG --ray --replicas 2                        # starts (or joins) Ray itself
    serve run sleigh.serve.ray_app:app_builder model=PKG replicas=2    # Ray's own CLI, same app

Each replica runs one generation at a time and lets `max_queue` more wait (503 beyond); Ray routes
each request to the replica with fewer ongoing requests. Autoscaling (min/max replicas, target
ongoing requests per replica) replaces the fixed count when `max_replicas` is given.

A shutdown of `sleigh serve --ray` (SIGTERM, Ctrl-C) drains the replicas itself before Ray stops them
(`drain`): through a small named actor (`DrainSignal`) that every replica polls (`watch_drain`), each
first answers new requests with OpenAI's 503 while those under way finish, then, once the shutdown
timeout has passed, cuts the rest off as `sleigh serve` without Ray does. Ray's own drain answered new
requests with its proxy's 404 (the application already gone) and an answer cut by its timeout with 500.
Under Ray's own `serve run` there is no such actor, and Ray drains alone. A shutdown takes at most
--shutdown-timeout, then CUT_WAIT_S for the cut answers to stop, then DRAINED_GRACE_S of Ray's own.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

from sleigh.errors import SleighError, first_line
from sleigh.serve import REPLICA_CPUS, REPLICAS, SHUTDOWN_TIMEOUT_S, TARGET_ONGOING_REQUESTS, check_shutdown_timeout
from sleigh.serve.app import ServeSettings

log = logging.getLogger("sleigh.serve")

DRAIN_NAMESPACE = "sleigh"  # the drain actor's, named after the application (drain_actor_name)
DRAIN_POLL_S = 0.2  # how often each replica asks the actor, and reports what it still has under way
HEARD_S = 5.0  # a replica not heard from for this long is gone (stopped by Ray, or never started)
POLL_TIMEOUT_S = 10.0  # one poll's wait for the actor; past it the replica polls again
CUT_WAIT_S = 10.0  # after the cut, for the answers under way to stop (a prefill runs to its end first)
DRAINED_GRACE_S = 5.0  # Ray's own grace for a replica once the drain is done: the last events of an answer


@dataclass(frozen=True)
class Scaling:
    replicas: int = REPLICAS
    min_replicas: int | None = None  # with max_replicas: autoscaling
    max_replicas: int | None = None
    target_ongoing_requests: float = TARGET_ONGOING_REQUESTS
    replica_cpus: float = REPLICA_CPUS
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


class DrainSignal:
    """The shutdown's phase ("serving", "draining", "cut"), set by `sleigh serve --ray`'s driver, and
    what each replica reported at its last poll. A Ray actor of no CPU (`start_drain_signal`)."""

    def __init__(self):
        self.phase, self.since, self.replicas = "serving", 0.0, {}

    def set_phase(self, phase: str) -> None:
        self.phase, self.since = phase, time.monotonic()

    def poll(self, replica: str, phase_seen: str, busy: int) -> str:
        """`phase_seen`: the phase the replica acts on; `busy`: its requests not yet answered."""
        self.replicas[replica] = (time.monotonic(), phase_seen, busy)
        return self.phase

    def settled(self) -> bool:
        """Whether every replica heard from acts on the current phase and has nothing under way."""
        now = time.monotonic()
        heard = [(seen, busy) for at, seen, busy in self.replicas.values() if now - at < HEARD_S and at > self.since]
        alive = [at for at, _, _ in self.replicas.values() if now - at < HEARD_S]
        return len(heard) == len(alive) and all(seen == self.phase and busy == 0 for seen, busy in heard)


def drain_actor_name(app: str) -> str:
    return f"sleigh-serve-drain-{app}"


def start_drain_signal(app: str):
    """The driver's DrainSignal actor for application `app`, before its replicas start (each looks for it
    once, at its start), on the driver's own node: it lives and dies with the driver."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    try:
        return ray.remote(num_cpus=0)(DrainSignal).options(name=drain_actor_name(app), namespace=DRAIN_NAMESPACE,
                                                          scheduling_strategy=here).remote()
    except ValueError as e:  # the name is taken: another driver serves this application on the cluster
        raise SleighError(f"Ray application {app!r}", f"is already served on this Ray cluster ({first_line(e)})",
                          "one `sleigh serve --ray` per cluster, or stop the other first") from None


def drain(signal, timeout_s: float, log) -> None:
    """New requests refused, those under way given `timeout_s` to finish, then cut off; returns once the
    replicas have nothing under way (or CUT_WAIT_S after the cut), for the application to be deleted."""
    if _settle(signal, "draining", timeout_s):
        return
    log.info("the shutdown timeout (%g s) has passed: cutting off the answers still under way", timeout_s)
    _settle(signal, "cut", CUT_WAIT_S)


def _settle(signal, phase: str, wait_s: float) -> bool:
    """Set `phase`; True once every replica acts on it with nothing under way, False after `wait_s`."""
    import ray

    ray.get(signal.set_phase.remote(phase))
    deadline = time.monotonic() + wait_s
    time.sleep(2 * DRAIN_POLL_S)  # every replica polls at least once in the new phase
    while not ray.get(signal.settled.remote()):
        if time.monotonic() > deadline:
            return False
        time.sleep(DRAIN_POLL_S)
    return True


def watch_drain(state, actor: str) -> None:
    """In a replica: poll the driver's DrainSignal named `actor` and act on its phase: "draining" refuses
    new requests, "cut" closes the worker, which stops the answers under way (each answered as cut off:
    app._cut_off). If the actor dies before the cut (the driver killed mid-drain), the replica serves
    again: the application lives on in the cluster, and refusing every request would be an outage."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        signal = ray.get_actor(actor, namespace=DRAIN_NAMESPACE)
    except ValueError:  # the driver is already gone
        log.warning("no drain signal %r: this replica is not drained by `sleigh serve --ray` at a shutdown", actor)
        return
    replica = f"{socket.gethostname()}:{os.getpid()}"

    def loop() -> None:
        seen = "serving"
        while True:
            try:
                phase = ray.get(signal.poll.remote(replica, seen, state.busy()), timeout=POLL_TIMEOUT_S)
            except GetTimeoutError:  # a slow cluster: ask again
                continue
            except RayActorError:  # the driver and its actor are gone
                if not state.cut and state.draining:
                    state.draining = False
                    log.warning("the drain signal is gone before the shutdown finished: serving again")
                return
            if phase != "serving":
                state.draining = True
            if phase == "cut" and not state.cut:
                state.cut = True
                if state.worker is not None:  # the running answer stops at its next token (a prefill runs to its
                    # end): closed beside this loop, which goes on reporting what is still under way
                    threading.Thread(target=state.worker.close, name="sleigh-cut", daemon=True).start()
            seen = phase
            time.sleep(DRAIN_POLL_S)

    threading.Thread(target=loop, name="sleigh-drain", daemon=True).start()


def build_app(settings: ServeSettings, scaling: Scaling = Scaling(), drain_actor: str | None = None):
    """A Ray Serve application (bind()-ed deployment) of `sleigh serve`'s app. `drain_actor`: the
    DrainSignal its replicas follow at a shutdown (`sleigh serve --ray`'s driver drains them itself, and
    Ray's own grace is then only for the last events); None: Ray drains them (`serve run`)."""
    from ray import serve

    def build_asgi_app():  # runs in each replica, which loads its own model
        from sleigh.serve.app import create_app, load_worker

        app = create_app(settings, load_worker(settings))
        if drain_actor is not None:
            watch_drain(app.state.sleigh, drain_actor)
        return app

    options = scaling.deployment_options(settings)
    if drain_actor is not None:
        options["graceful_shutdown_timeout_s"] = DRAINED_GRACE_S
    ingress = serve.ingress(build_asgi_app)()
    return serve.deployment(ingress, name="sleigh", **options).bind()


def app_builder(args: dict):
    """For `serve run sleigh.serve.ray_app:app_builder model=PKG [replicas=2] [max_queue=16] ...`: keys
    are ServeSettings' and Scaling's field names."""
    settings_keys = {f.name: f.type for f in fields(ServeSettings)}
    scaling_keys = {f.name: f.type for f in fields(Scaling)}
    unknown = sorted(set(args) - set(settings_keys) - set(scaling_keys))
    if unknown or "model" not in args:
        raise SleighError("serve run args", f"unknown {unknown}" if unknown else "no model=PKG",
                          f"model=PKG and any of {sorted((set(settings_keys) | set(scaling_keys)) - {'model'})}")
    settings = ServeSettings(**{k: _convert(k, v, settings_keys[k]) for k, v in args.items() if k in settings_keys})
    scaling = Scaling(**{k: _convert(k, v, scaling_keys[k]) for k, v in args.items() if k in scaling_keys})
    return build_app(settings, scaling)


CONVERT = {"int": int, "float": float, "Path": Path, "str": str}


def _convert(key: str, value, annotation: str):
    """`serve run`'s text for a field, as the field's annotation says (`int | None`: an int; max_memory
    also as a size, 2.5G, as --max-memory reads it; a config file's null is None)."""
    if value is None:
        return None
    if key == "max_memory":
        from sleigh.runtime.memory import parse_size

        return parse_size(value)
    kind = CONVERT[annotation.split(" | ")[0]]
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise SleighError(f"serve run {key}={value}", f"not {'an' if kind is int else 'a'} {kind.__name__}",
                          f"{'an' if kind is int else 'a'} {kind.__name__}") from None
