"""Placement by cache affinity: prompt block hashes, the policies, and the relay following them."""

import asyncio

import pytest

from llmserve import LLMConfig
from llmserve.affinity import (
    AFFINITY_SLACK,
    BLOCK_CHARS,
    BLOCKS_PER_REPLICA,
    CACHED,
    FRESH_HALF_LIFE_S,
    LEASE_ROUTER_PATH,
    ROOMIEST,
    ReplicaCaches,
    Wanted,
    policy_of,
    prefix_blocks,
    prompt_text,
    serve_router_config,
)

SYSTEM_A = "slow and terse, you assist the accounts team. " * 30  # (the fake engine streams it slowly)
SYSTEM_B = "You answer questions about the warehouse inventory. " * 30


def chat_body(system, question, model="alpha"):
    return {"model": model, "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}


def test_prompts_that_begin_alike_share_their_leading_block_hashes_and_nothing_else():
    one = Wanted.of("chat", chat_body(SYSTEM_A, "What is due today?"), None).blocks
    two = Wanted.of("chat", chat_body(SYSTEM_A, "Who approved the refund?"), None).blocks
    other = Wanted.of("chat", chat_body(SYSTEM_B, "What is due today?"), None).blocks
    shared = len(SYSTEM_A) // BLOCK_CHARS
    assert len(one) >= shared and one[:shared] == two[:shared]
    assert not set(one) & set(other)
    # The same text under an adapter is another cache (vLLM keys blocks by adapter too).
    assert not set(prefix_blocks(SYSTEM_A, "sql")) & set(prefix_blocks(SYSTEM_A, None))
    assert prefix_blocks("short prompt") == ()


def test_the_prompt_text_comes_from_each_endpoint_s_own_field():
    assert "accounts" in prompt_text("completions", {"prompt": SYSTEM_A})
    assert prompt_text("completions", {"prompt": [1, 2, 3]}) == "1,2,3"
    assert "accounts" in prompt_text("responses", {"input": [{"role": "user", "content": SYSTEM_A}]})
    assert prompt_text("embeddings", {"input": SYSTEM_A}) == ""
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": SYSTEM_B}]}]}
    assert "warehouse" in prompt_text("chat", parts)


def test_a_request_goes_where_its_prefix_went_unless_that_replica_is_much_busier():
    caches = ReplicaCaches("prefix")
    first = Wanted.of("completions", {"prompt": SYSTEM_A + "question one"}, None)
    again = Wanted.of("completions", {"prompt": SYSTEM_A + "question two"}, None)
    caches.sent("http://a", first)
    assert caches.choose({"http://a": 3, "http://b": 0}, again) == ("http://a", CACHED)
    # Too busy: the prefix is new to the others, and goes to the roomiest of them.
    assert caches.choose({"http://a": AFFINITY_SLACK + 1, "http://b": 0}, again) == ("http://b", ROOMIEST)
    # A new prefix goes to the least busy replica, then where the least new text went (a, b),
    # then to one with an open lease.
    new = Wanted.of("completions", {"prompt": SYSTEM_B}, None)
    assert caches.choose({"http://a": 0, "http://b": 1}, new) == ("http://a", ROOMIEST)
    assert caches.choose({"http://a": 1, "http://b": 1}, new) == ("http://b", ROOMIEST)
    assert caches.choose({"http://a": 1, "http://b": 1, "http://c": 1}, new, idle={"http://c"}) == ("http://c", ROOMIEST)
    # A short prompt has no prefix: the least busy, Serve's choice.
    assert caches.choose({"http://a": 0, "http://b": 1}, Wanted.of("completions", {"prompt": "hi"}, None)) == ("http://a", None)
    # The longest run of matching blocks wins over a shorter one.
    caches.sent("http://b", Wanted.of("completions", {"prompt": SYSTEM_A[: BLOCK_CHARS * 2]}, None))
    assert caches.choose({"http://a": 1, "http://b": 0}, again) == ("http://a", CACHED)
    caches.forget("http://a")
    assert caches.choose({"http://a": 0, "http://b": 1}, again) == ("http://b", CACHED)


def test_new_prefixes_are_shared_out_so_each_cache_gets_its_share():
    caches = ReplicaCaches("prefix")
    homes = []
    for n in range(16):
        prompt = Wanted.of("completions", {"prompt": f"System prompt number {n}. " * 60}, None)
        home, why = caches.choose({"http://a": 0, "http://b": 0}, prompt)
        assert why == ROOMIEST
        caches.sent(home, prompt)
        homes.append(home)
    assert homes.count("http://a") == homes.count("http://b") == 8, homes
    # However roomy, a busier replica gets no new prefix.
    caches.forget("http://a")
    busy = {"http://a": AFFINITY_SLACK + 1, "http://b": 0}
    assert caches.choose(busy, Wanted.of("completions", {"prompt": SYSTEM_B}, None)) == ("http://b", ROOMIEST)


def test_what_was_sent_long_ago_counts_less_against_a_replica_s_room(monkeypatch):
    import llmserve.affinity as affinity

    now = [1000.0]
    monkeypatch.setattr(affinity.time, "monotonic", lambda: now[0])
    caches = ReplicaCaches("prefix")
    caches.sent("http://a", Wanted(blocks=tuple(range(40))))
    now[0] += FRESH_HALF_LIFE_S
    caches.sent("http://b", Wanted(blocks=tuple(range(100, 125))))
    # a: 40 blocks a half-life ago (20 now), b: 25 just now.
    assert caches.choose({"http://a": 0, "http://b": 0}, Wanted(blocks=(7000, 7001))) == ("http://a", ROOMIEST)


def test_a_new_prefix_waits_for_no_choice_when_serve_runs_a_replica_not_yet_placed_on():
    caches = ReplicaCaches("prefix")
    known = Wanted.of("completions", {"prompt": SYSTEM_A + "one"}, None)
    caches.sent("http://a", known)
    # The relay then names one of those replicas to Serve by its id (the roomiest: it holds nothing).
    assert caches.choose({"http://a": 0}, Wanted.of("completions", {"prompt": SYSTEM_B}, None), unplaced=True) == (None, ROOMIEST)
    assert caches.choose({"http://a": 0}, known, unplaced=True) == ("http://a", CACHED)
    assert caches.choose({"http://a": 0}, Wanted.of("completions", {"prompt": "hi"}, None), unplaced=True) == ("http://a", None)


def test_an_adapter_stays_with_the_replica_that_holds_it_on_the_same_terms():
    caches = ReplicaCaches("prefix")
    caches.sent("http://b", Wanted("sql"))
    assert caches.choose({"http://a": 0, "http://b": 4}, Wanted("sql")) == ("http://b", CACHED)
    assert caches.choose({"http://a": 0, "http://b": AFFINITY_SLACK + 1}, Wanted("sql"))[0] == "http://a"


def test_what_a_replica_is_thought_to_hold_is_bounded_oldest_out_first():
    caches = ReplicaCaches("prefix")
    old = Wanted(blocks=(1, 2))
    caches.sent("http://a", old)
    caches.sent("http://a", Wanted(blocks=tuple(range(100, 100 + BLOCKS_PER_REPLICA))))
    assert caches.choose({"http://a": 5, "http://b": 0}, old) == ("http://b", ROOMIEST)


def test_the_baseline_policies_ignore_the_cache():
    wanted = Wanted.of("completions", {"prompt": SYSTEM_A}, None)
    turns = ReplicaCaches("round_robin")
    turns.sent("http://a", wanted)
    picks = [turns.choose({"http://a": 0, "http://b": 9}, wanted)[0] for _ in range(4)]
    assert sorted(picks) == ["http://a", "http://a", "http://b", "http://b"] and picks[0] != picks[1]
    two = ReplicaCaches("power_of_two")
    assert {two.choose({"http://a": 5, "http://b": 1}, wanted) for _ in range(20)} == {("http://b", None)}
    plain = ReplicaCaches("least_loaded")
    plain.sent("http://a", wanted)
    assert plain.choose({"http://a": 1, "http://b": 0}, wanted) == ("http://b", None)


def test_the_policy_is_the_router_config_s_and_serve_gets_the_lease_router():
    assert policy_of(None) == "prefix"
    assert policy_of({"request_router_kwargs": {"policy": "round_robin"}}) == "round_robin"
    # ray.serve.llm configs name Ray's routers: each gets the policy that does its job.
    assert policy_of({"request_router_class": "ray.serve.llm.request_router:PrefixCacheAffinityRouter"}) == "prefix"
    assert policy_of({"request_router_class": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"}) == "power_of_two"
    with pytest.raises(ValueError, match="policy must be one of"):
        LLMConfig(model_loading_config={"model_id": "m"}, deployment_config={"request_router_config": {"request_router_kwargs": {"policy": "nearest"}}})
    options = LLMConfig(model_loading_config={"model_id": "m"}).get_serve_options(name_prefix="x:")
    assert options["request_router_config"]["request_router_class"] == LEASE_ROUTER_PATH
    kept = serve_router_config({"request_router_class": "mine.Router", "request_routing_stats_period_s": 3})
    assert kept == {"request_router_class": "mine.Router", "request_routing_stats_period_s": 3}
    from ray.serve.config import RequestRouterConfig

    # Serve imports the class from the path and accepts the options.
    config = RequestRouterConfig(**options["request_router_config"])
    assert config.get_request_router_class().__name__ == "LeaseRouter"


def test_through_the_relay_requests_sharing_a_prefix_run_on_one_replica_and_others_spread():
    from tests.unit.test_relay import Relayed, client, settle

    async def go():
        async with Relayed(replicas=2) as relayed, client(relayed.app) as http:
            slow = {"model": "alpha", "prompt": "slow a b c", "stream": True}
            warm = await asyncio.gather(*(http.post("/v1/completions", json=slow) for _ in range(2)))
            assert len({answer.headers["x-llmserve-replica"] for answer in warm}) == 2

            async def replica_for(system, question):
                answer = await http.post("/v1/chat/completions", json=chat_body(system, question))
                assert answer.status_code == 200
                return answer.headers["x-llmserve-replica"]

            a_replicas = {await replica_for(SYSTEM_A, f"question {n}") for n in range(5)}
            assert len(a_replicas) == 1
            # Past the open leases' linger, the preferred replica is asked of Serve by name.
            await asyncio.sleep(1.3)
            assert await settle(lambda: not any(relayed.relay._idle_leases.values()))
            assert await replica_for(SYSTEM_A, "question after a pause") in a_replicas
            # A new prefix goes to the roomier replica: the one A's did not go to.
            b_replica = await replica_for(SYSTEM_B, "first")
            assert b_replica not in a_replicas
            assert {await replica_for(SYSTEM_B, f"again {n}") for n in range(3)} == {b_replica}

    asyncio.run(go())


def test_a_new_prefix_goes_first_to_a_replica_serve_runs_that_the_ingress_has_not_placed_on(monkeypatch):
    """A replica Serve added (or restarted) is found by the next new prefix: the relay names it
    to Serve by its id, from the replicas LeaseRouter last heard of."""
    from types import SimpleNamespace

    import llmserve.affinity as affinity
    from tests.unit.test_relay import Relayed, client

    async def go():
        async with Relayed(replicas=2) as relayed, client(relayed.app) as http:
            relayed.handle.deployment_id = SimpleNamespace(app_name="app", name="LLMServer:alpha")
            monkeypatch.setitem(affinity._serve_replicas, ("app", "LLMServer:alpha"), frozenset({"replica-0", "replica-1"}))
            # A short prompt: Serve's choice (here: the first replica); the ingress now knows one.
            short = await http.post("/v1/completions", json={"model": "alpha", "prompt": "hi"})
            first = short.headers["x-llmserve-replica"]
            answer = await http.post("/v1/chat/completions", json=chat_body(SYSTEM_A, "question"))
            assert answer.status_code == 200
            assert answer.headers["x-llmserve-replica"] != first

    asyncio.run(go())


def test_a_burst_of_new_prefixes_is_shared_out_while_their_leases_are_on_their_way(monkeypatch):
    """Requests that arrive while earlier ones still wait for their leases see those where they
    are going: a burst of new prefixes does not all pick the same roomiest replica."""
    from llmserve.testing import LeaseCall
    from tests.unit.test_relay import Relayed

    reaching = LeaseCall.__anext__

    async def slow_lease(self):  # (as Serve's, a few round trips away)
        await asyncio.sleep(0.05)
        return await reaching(self)

    monkeypatch.setattr(LeaseCall, "__anext__", slow_lease)

    async def go():
        async with Relayed(replicas=2) as relayed:
            relay = relayed.relay
            # One request held open on each replica: both known, no idle lease to take at once.
            held = await asyncio.gather(relay.place(), relay.place())
            (a, _), (b, _) = held
            assert a != b
            relay.caches.sent(a, Wanted.of("completions", {"prompt": SYSTEM_A}, None))
            burst = [Wanted.of("completions", {"prompt": f"System prompt number {n}. " * 60}, None) for n in range(3)]
            placed = await asyncio.gather(*(relay.place(wanted) for wanted in burst))
            homes = [url for url, _ in placed]
            # Both equally busy, b roomier: b; then a, now the less busy; then b again, roomier.
            assert sorted(homes) == sorted([a, b, b]), homes
            for _, done in [*held, *placed]:
                done()

    asyncio.run(go())
