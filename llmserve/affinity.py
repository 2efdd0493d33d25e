"""Which replica a request runs on: where its prompt's prefix and its adapter are most likely cached.

vLLM keeps the KV cache of the prompts it computed and reuses it for a later
prompt that begins the same way (prefix caching): a 1,000-token system prompt
seen before costs a few tens of milliseconds instead of a full prefill. With
several replicas that pays only if requests sharing a prefix go to the same
replica, and a placement by load alone spreads them over all of them.

The ingress therefore remembers, per replica, the prompt blocks it sent there
(``ReplicaCaches``): a prompt's text is cut into ``BLOCK_CHARS`` blocks, each
hashed with every block before it and the adapter, so one hash names a whole
prefix, as vLLM's block hashes do (a block is only reused with the same
adapter). A request goes to the replica that holds the longest run of its
leading blocks, unless that replica has more than ``AFFINITY_SLACK`` requests
in flight beyond the least busy one; else to a replica holding its adapter,
on the same terms. A prompt no replica holds (a whole prefill) goes to the least
busy replica, and among equally busy ones to the one that was sent the least new
prompt text lately (``FRESH_HALF_LIFE_S``), first to one Serve runs that this
ingress has not placed on yet: each cache then gets its share of the prefixes,
where a placement by load alone would let one cache get more than it holds.
Prompts shorter than one block go to the least busy replica, Serve's choice. What the ingress remembers is an estimate (it cannot
see the engine evict); it is bounded per replica by ``BLOCKS_PER_REPLICA``,
least recently used first, and its error costs only a cache miss.

``round_robin`` and ``power_of_two`` (two replicas at random, the less busy
one) exist as baselines, to measure the placement against
(``benchmarks/bench_prefix.py``). The policy is the model's
``deployment_config.request_router_config.request_router_kwargs.policy``.

The chosen replica is a preference, never a bypass of Serve: the request
still runs under a lease Serve grants (``relay.py``), and ``LeaseRouter``,
the Serve request router of ``LLMServer`` deployments, offers a lease to the
preferred replica first and, if that one is full, to the others by Serve's
own power of two choices.

Example::

    caches = ReplicaCaches("prefix")
    wanted = Wanted.of("chat", body, adapter=None)
    url, why = caches.choose({"http://a": 3, "http://b": 1}, wanted)
    caches.sent(url, wanted)
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, List, Optional

# vLLM hashes blocks of 16 tokens on GPUs and 128 on CPUs, ~4 characters each; a
# block of 256 characters is fine enough to tell prefixes apart and cheap to hash.
BLOCK_CHARS = 256
# Prompts are hashed up to this length: enough to tell long system prompts and
# conversations apart, bounded for a huge prompt (~0.1 ms per 64 KiB).
MAX_PREFIX_CHARS = 64 * 1024
# ~4 M characters (~1 M tokens) of prompt remembered per replica: more than the KV
# cache of most replicas holds, so an evicted prefix still goes where it was.
BLOCKS_PER_REPLICA = 16384
# A replica that holds a request's prefix or adapter is preferred while it has at
# most this many more requests in flight than the least busy replica.
AFFINITY_SLACK = 8
# Among equally busy replicas, a prompt no replica holds goes where the least new prompt
# text went lately: each replica's new blocks, counted down by half every this many seconds.
FRESH_HALF_LIFE_S = 60.0
POLICIES = ("prefix", "least_loaded", "power_of_two", "round_robin")
# Why ``ReplicaCaches.choose`` chose a replica: it likely holds the prefix or adapter (CACHED),
# it has the most room for a new prefix (ROOMIEST), or by load (None: Serve may choose).
CACHED = "cached"
ROOMIEST = "roomiest"
# The keyword of ``LLMServer.reserve`` that names the preferred replica to ``LeaseRouter``.
PREFER_KWARG = "prefer"
# ``LeaseRouter`` as Serve's `request_router_class` names it (module:Class).
LEASE_ROUTER_PATH = "llmserve.affinity:LeaseRouter"


@dataclass(frozen=True)
class Wanted:
    """What a request would find cached: its adapter and its prompt's block hashes."""

    adapter: Optional[str] = None
    blocks: tuple[int, ...] = ()

    @classmethod
    def of(cls, endpoint: str, body: dict[str, Any], adapter: Optional[str]) -> "Wanted":
        return cls(adapter, prefix_blocks(prompt_text(endpoint, body), adapter))


def prompt_text(endpoint: str, body: dict[str, Any]) -> str:
    """The part of a request that becomes its prompt's beginning, as text ("" when none)."""
    if endpoint == "chat":
        return _messages_text(body.get("messages"))
    if endpoint == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(item, int) for item in prompt):
            return ",".join(map(str, prompt))  # token ids: the same ids, the same text
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        return prompt if isinstance(prompt, str) else ""
    if endpoint == "responses":
        given = body.get("input")
        instructions = body.get("instructions") if isinstance(body.get("instructions"), str) else ""
        return instructions + "\n" + (given if isinstance(given, str) else _messages_text(given))
    return ""  # embeddings, scores and the like: no prefix to reuse


def _messages_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    parts: List[str] = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        parts.append(str(message.get("role", "")))
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict):
                    parts.append(str(part.get("text") or part.get("image_url") or part.get("input_text") or ""))
        if sum(map(len, parts)) >= MAX_PREFIX_CHARS:
            break
    return "\n".join(parts)


def prefix_blocks(text: str, adapter: Optional[str] = None) -> tuple[int, ...]:
    """One hash per whole ``BLOCK_CHARS`` block of ``text``, each covering the prefix up to its block."""
    chained = hash(adapter or "")
    blocks = []
    end = min(len(text), MAX_PREFIX_CHARS)
    for start in range(0, end - BLOCK_CHARS + 1, BLOCK_CHARS):
        chained = hash((chained, text[start : start + BLOCK_CHARS]))
        blocks.append(chained)
    return tuple(blocks)


@dataclass(frozen=True)
class Sent:
    """What one request brought to a replica's estimate: an adapter and blocks it did not hold."""

    replica_url: str
    new_adapter: Optional[str]
    new_blocks: tuple[int, ...]


class ReplicaCaches:
    """The ingress's estimate of what each replica has cached, and the placement it drives."""

    def __init__(self, policy: str = "prefix"):
        if policy not in POLICIES:
            raise ValueError(f"unknown placement policy {policy!r}; one of {POLICIES}")
        self.policy = policy
        self._blocks: dict[str, OrderedDict[int, None]] = {}  # replica URL -> block hashes, oldest first
        self._adapters: dict[str, dict[str, None]] = {}  # replica URL -> adapters sent there
        self._fresh: dict[str, tuple[float, float]] = {}  # replica URL -> (new blocks sent lately, when counted)
        self._turn = 0

    def choose(
        self, in_flight: dict[str, int], wanted: Wanted, idle: Optional[set[str]] = None, unplaced: bool = False
    ) -> tuple[Optional[str], Optional[str]]:
        """The replica for a request among ``in_flight`` (URL -> this ingress's requests on it),
        and why: CACHED or ROOMIEST (the request then waits for a place there), or None (by load).

        A long prompt that no replica holds goes ROOMIEST; with ``unplaced`` (Serve runs
        replicas this ingress has not placed on) None is returned for it instead of a URL:
        one of those is the roomiest. Else the least busy replica, one with an ``idle``
        lease first among equals (it needs no Serve call).
        """
        if not in_flight:
            return None, None
        urls = sorted(in_flight)
        if self.policy == "round_robin":
            self._turn += 1
            return urls[self._turn % len(urls)], None
        if self.policy == "power_of_two":
            pair = random.sample(urls, 2) if len(urls) > 1 else urls
            return min(pair, key=in_flight.__getitem__), None
        fewest = min(in_flight.values())
        within_slack = [url for url in urls if in_flight[url] <= fewest + AFFINITY_SLACK]
        if self.policy == "prefix" and wanted.blocks:
            matched = {url: self._matched_blocks(url, wanted.blocks) for url in within_slack}
            longest = max(matched.values())
            if longest:
                best = [url for url in within_slack if matched[url] == longest]
                return min(best, key=lambda url: (in_flight[url], random.random())), CACHED
        if wanted.adapter is not None:
            holders = [url for url in within_slack if wanted.adapter in self._adapters.get(url, ())]
            if holders:
                return min(holders, key=lambda url: (in_flight[url], random.random())), CACHED
        if self.policy == "prefix" and wanted.blocks:
            if unplaced:
                return None, ROOMIEST
            now = time.monotonic()
            # The least busy first: a new prefix is a whole prefill, and a burst of them must not
            # queue on one replica. Among equally busy ones, the one sent the least new text lately.
            return min(urls, key=lambda url: (in_flight[url], round(self._fresh_blocks(url, now)), url not in (idle or ()), random.random())), ROOMIEST
        least_busy = [url for url in urls if in_flight[url] == fewest]
        with_a_lease = [url for url in least_busy if url in (idle or ())]
        return random.choice(with_a_lease or least_busy), None

    def sent(self, replica_url: str, wanted: Wanted) -> "Sent":
        """A request went (or is going) to that replica: its prefix and adapter are there now.
        Returns what was new there, for ``unsent`` should the request land elsewhere."""
        new_adapter = wanted.adapter is not None and wanted.adapter not in self._adapters.get(replica_url, ())
        if new_adapter:
            self._adapters.setdefault(replica_url, {})[wanted.adapter] = None
        if not wanted.blocks or self.policy != "prefix":
            return Sent(replica_url, wanted.adapter if new_adapter else None, ())
        cached = self._blocks.setdefault(replica_url, OrderedDict())
        new = tuple(block for block in wanted.blocks if block not in cached)
        now = time.monotonic()
        self._fresh[replica_url] = (self._fresh_blocks(replica_url, now) + len(new), now)
        for block in wanted.blocks:
            cached[block] = None
            cached.move_to_end(block)
        while len(cached) > BLOCKS_PER_REPLICA:
            cached.popitem(last=False)
        return Sent(replica_url, wanted.adapter if new_adapter else None, new)

    def unsent(self, sent: "Sent") -> None:
        """The request ``sent`` counted went to another replica after all: take back what it brought."""
        if sent.new_adapter is not None:
            self._adapters.get(sent.replica_url, {}).pop(sent.new_adapter, None)
        cached = self._blocks.get(sent.replica_url)
        if cached is None or not sent.new_blocks:
            return
        for block in sent.new_blocks:
            cached.pop(block, None)
        now = time.monotonic()
        self._fresh[sent.replica_url] = (max(0.0, self._fresh_blocks(sent.replica_url, now) - len(sent.new_blocks)), now)

    def forget(self, replica_url: str) -> None:
        """That replica is gone (or restarted, with an empty cache)."""
        self._blocks.pop(replica_url, None)
        self._adapters.pop(replica_url, None)
        self._fresh.pop(replica_url, None)

    def _fresh_blocks(self, replica_url: str, now: float) -> float:
        """The new blocks sent to that replica lately (each counts half after FRESH_HALF_LIFE_S)."""
        count, counted_at = self._fresh.get(replica_url, (0.0, now))
        return count * 0.5 ** ((now - counted_at) / FRESH_HALF_LIFE_S)

    def _matched_blocks(self, replica_url: str, blocks: tuple[int, ...]) -> int:
        cached = self._blocks.get(replica_url)
        if not cached:
            return 0
        matched = 0
        for block in blocks:
            if block not in cached:
                break
            matched += 1
        return matched


# Ray's own routers, as ray.serve.llm configs name them: each maps to the policy that does its job.
_RAY_ROUTER_POLICIES = {
    "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter": "power_of_two",
    "ray.serve._private.request_router.pow_2_router:PowerOfTwoChoicesRequestRouter": "power_of_two",
    "ray.serve.llm.request_router:PrefixCacheAffinityRouter": "prefix",
    "ray.serve.llm.request_router.PrefixCacheAffinityRouter": "prefix",
}


def policy_of(request_router_config: Optional[dict[str, Any]]) -> str:
    """The placement policy a model's ``request_router_config`` asks for: its
    ``request_router_kwargs.policy``, else the one that does the job of the Ray router
    it names, else "prefix"."""
    config = request_router_config or {}
    kwargs = config.get("request_router_kwargs") or {}
    policy = kwargs.get("policy") or _RAY_ROUTER_POLICIES.get(str(config.get("request_router_class")), "prefix")
    if policy not in POLICIES:
        raise ValueError(f"request_router_kwargs.policy must be one of {POLICIES}, not {policy!r}")
    return policy


def serve_router_config(request_router_config: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The deployment's ``request_router_config`` for Serve: ``LeaseRouter`` in place of
    Ray's routers (a custom router class of the user's stays, and routes leases its way)."""
    config = dict(request_router_config or {})
    policy_of(config)  # (a wrong policy fails here, before anything starts)
    if config.get("request_router_class") in (None, *_RAY_ROUTER_POLICIES):
        config["request_router_class"] = LEASE_ROUTER_PATH
    return config


# Each deployment's replicas as Serve's router in this process last heard of them
# ((app, deployment) -> Serve replica ids); ``LeaseRouter`` keeps it.
_serve_replicas: dict[tuple[str, str], frozenset[str]] = {}


def replicas_serve_runs(deployment_id: Any) -> frozenset[str]:
    """The Serve replica ids of a deployment (a handle's ``deployment_id``) that Serve's router in
    this process knows to be running; empty before its first request, or outside Serve."""
    if deployment_id is None:
        return frozenset()
    return _serve_replicas.get((deployment_id.app_name, deployment_id.name), frozenset())


def _lease_router_class() -> type:
    from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

    class LeaseRouter(PowerOfTwoChoicesRequestRouter):
        """Serve's request router for ``LLMServer``: a lease that names a preferred replica
        (``prefer=`` its Serve replica id) is offered to that replica first, then to two
        others by Serve's power of two choices; any other call is routed as Serve's default
        router routes it. A full replica refuses the lease as it refuses any request."""

        def initialize_state(self, policy: str = "prefix", **kwargs: Any) -> None:
            # The policy is the ingress's to apply (``ReplicaCaches``); the router only honours its choice.
            super().initialize_state(**kwargs)

        def update_replicas(self, replicas: list) -> None:
            super().update_replicas(replicas)
            key = (self._deployment_id.app_name, self._deployment_id.name)
            _serve_replicas[key] = frozenset(replica.replica_id.unique_id for replica in replicas)

        async def choose_replicas(self, candidate_replicas: list, pending_request: Any = None) -> list:
            ranks = await super().choose_replicas(candidate_replicas, pending_request)
            prefer = pending_request.kwargs.get(PREFER_KWARG) if pending_request is not None else None
            if prefer:
                preferred = [replica for replica in candidate_replicas if replica.replica_id.unique_id == prefer]
                if preferred:
                    return [preferred] + ranks
            return ranks

        def _fulfill_next_pending_request(self, replica: Any, request_metadata: Any = None) -> None:
            # A replica chosen for a preferred lease goes to that lease, not to the oldest
            # one waiting (Serve's FIFO): else a preference would land on another request.
            pending = self._get_pending_request_matching_internal_request_id(request_metadata)
            if pending is not None and pending.kwargs.get(PREFER_KWARG):
                from ray.serve._private.request_router.request_router import RequestRouter

                RequestRouter._fulfill_next_pending_request(self, replica, request_metadata)
                return
            super()._fulfill_next_pending_request(replica, request_metadata)

    LeaseRouter.__qualname__ = "LeaseRouter"  # (pickled by reference: llmserve.affinity.LeaseRouter)
    return LeaseRouter


def __getattr__(name: str) -> Any:
    # ``LeaseRouter`` is made on first use (Serve imports it by path), so importing this
    # module does not import Serve: `llmserve --help` and config checks stay light.
    if name == "LeaseRouter":
        globals()[name] = _lease_router_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
