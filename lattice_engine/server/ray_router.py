"""The Ray Serve request router of the engine's replicas (Ray Serve's custom request
router API, `RequestRouterConfig(request_router_class=...)`): `routing.PrefixRouter` over
the live replicas. Ray runs it inside the DeploymentHandle of the process that calls the
replicas (the ingress); it is a module of its own because it imports Ray, and because Ray
ships this module to that process by value (cloudpickle): state shared with the ingress
lives in `routing` (imported by reference), not here."""

from __future__ import annotations

from ray.serve.request_router import RequestRouter

from . import routing as shared
from .routing import PrefixRouter, RouteHint


def hint_of(pending_request) -> RouteHint:
    """The request's RouteHint (the ingress passes it as the first argument)."""
    if pending_request is not None:
        for arg in pending_request.args:
            if isinstance(arg, RouteHint):
                return arg
    return RouteHint()


class PrefixAffinityRouter(RequestRouter):
    """Ranks the candidate replicas: first the one `PrefixRouter` picks from the request's
    prefix key and the in-flight counts, then the others from least to most loaded (Ray
    moves down the ranks when a replica is at max_ongoing_requests). In flight = requests
    this handle sent to the replica and that have not completed."""

    def initialize_state(self, routing: str = "prefix", vnodes: int = 64,
                         max_imbalance: int = 4):
        self.policy = PrefixRouter(routing, vnodes=vnodes, max_imbalance=max_imbalance)
        self.in_flight: dict[str, int] = {}
        shared.ACTIVE.append(self.policy)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        by_name = {r.replica_id.unique_id: r for r in candidate_replicas}
        hint = hint_of(pending_request)
        if hint.replica is not None:  # a call for one replica: that one or none
            target = by_name.get(hint.replica)
            return [[target]] if target is not None else []
        loads = {name: self.in_flight.get(name, 0) for name in by_name}
        first = self.policy.choose(hint.key, loads)
        rest = sorted((n for n in by_name if n != first), key=lambda n: (loads[n], n))
        return [[by_name[first]]] + [[by_name[n]] for n in rest]

    def on_send_request(self, replica_id):
        super().on_send_request(replica_id)
        name = replica_id.unique_id
        self.in_flight[name] = self.in_flight.get(name, 0) + 1

    def on_request_completed(self, replica_id, internal_request_id):
        super().on_request_completed(replica_id, internal_request_id)
        name = replica_id.unique_id
        self.in_flight[name] = max(0, self.in_flight.get(name, 0) - 1)

    def on_replica_actor_died(self, replica_id):
        super().on_replica_actor_died(replica_id)
        self.in_flight.pop(replica_id.unique_id, None)
