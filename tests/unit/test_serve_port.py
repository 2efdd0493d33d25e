"""The front door takes its node's connections from a listener standing in for Serve's proxy
(real sockets, as Serve's proxy binds them), and gives them back when it closes."""

import socket
import time

import pytest

from llmserve import serve_port

def proxy_like(host: str, port: int = 0) -> socket.socket:
    """A listener bound as Serve's proxy binds (http_util.start_asgi_http_server): SO_REUSEADDR and SO_REUSEPORT."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind((host, port))
    listener.listen(64)
    listener.setblocking(False)
    return listener


def who_accepts(listeners: dict[str, socket.socket], address: tuple[str, int], connections: int = 30) -> dict[str, int]:
    accepted = dict.fromkeys(listeners, 0)
    for _ in range(connections):
        with socket.create_connection(address, timeout=5):
            deadline = time.monotonic() + 2
            while sum(accepted.values()) < connections and time.monotonic() < deadline:
                taken = False
                for name, listener in listeners.items():
                    try:
                        listener.accept()[0].close()
                    except BlockingIOError:
                        continue
                    accepted[name] += 1
                    taken = True
                if taken:
                    break
                time.sleep(0.001)
    return accepted


@pytest.mark.parametrize("proxy_host", ["0.0.0.0", "127.0.0.1"])
def test_the_front_door_gets_every_connection_to_the_proxys_port_and_gives_them_back_when_it_closes(proxy_host):
    proxy = proxy_like(proxy_host)
    port = proxy.getsockname()[1]
    try:
        assert who_accepts({"proxy": proxy}, ("127.0.0.1", port)) == {"proxy": 30}
        addresses = serve_port.shadowing_addresses(proxy_host, serve_port.interfaces_by_address())
        assert ("127.0.0.1", None if proxy_host == "0.0.0.0" else "lo") in addresses
        doors = serve_port.listen_before(addresses, port)
        door = next(listener for listener in doors if listener.getsockname()[0] == "127.0.0.1")
        assert who_accepts({"proxy": proxy, "door": door}, ("127.0.0.1", port)) == {"proxy": 0, "door": 30}
        # A second ingress replica on the node shares the port with the first, not with the proxy.
        second = serve_port.listen_before(addresses, port)
        other = next(listener for listener in second if listener.getsockname()[0] == "127.0.0.1")
        shared = who_accepts({"proxy": proxy, "door": door, "other": other}, ("127.0.0.1", port), connections=60)
        assert shared["proxy"] == 0 and shared["door"] > 0 and shared["other"] > 0
        for listener in doors + second:
            listener.close()
        assert who_accepts({"proxy": proxy}, ("127.0.0.1", port)) == {"proxy": 30}  # Serve's proxy serves again
    finally:
        proxy.close()


def test_a_wildcard_proxy_that_comes_back_after_the_front_door_gets_nothing():
    """Serve restarts a dead proxy; one bound to 0.0.0.0 never takes precedence over the front door's addresses."""
    first = proxy_like("0.0.0.0")
    port = first.getsockname()[1]
    doors = serve_port.listen_before(serve_port.shadowing_addresses("0.0.0.0", serve_port.interfaces_by_address()), port)
    try:
        first.close()
        restarted = proxy_like("0.0.0.0", port)
        door = next(listener for listener in doors if listener.getsockname()[0] == "127.0.0.1")
        assert who_accepts({"proxy": restarted, "door": door}, ("127.0.0.1", port)) == {"proxy": 0, "door": 30}
        restarted.close()
    finally:
        for listener in doors:
            listener.close()


def test_where_the_front_door_listens_for_each_proxy_host():
    interfaces = {"127.0.0.1": "lo", "10.1.2.3": "eth0"}
    assert serve_port.shadowing_addresses("0.0.0.0", interfaces) == [("10.1.2.3", None), ("127.0.0.1", None)]
    assert serve_port.shadowing_addresses("10.1.2.3", interfaces) == [("10.1.2.3", "eth0")]
    assert serve_port.shadowing_addresses("localhost", interfaces) == [("127.0.0.1", "lo")]
    assert serve_port.shadowing_addresses("::", interfaces) == []  # IPv6: Serve's proxy keeps the port
    assert serve_port.shadowing_addresses("10.9.9.9", interfaces) == []  # not an address of this node


def details(**changes):
    base = {"proxy_location": "EveryNode", "proxies": {"node-1": {"status": "HEALTHY"}}, "applications": {"llm_app": {"route_prefix": "/"}}}
    return {**base, **changes}


ANY = {"host": "0.0.0.0", "port": 8000}
LOOPBACK = {"host": "127.0.0.1", "port": 8000}


@pytest.mark.parametrize(
    "instance, http, reason",
    [
        (details(), ANY, None),
        (details(proxies={}), ANY, None),  # EveryNode: the proxy of this node is still starting; the addresses win anyway
        (details(proxy_location="HeadOnly", proxies={"head": {}}), ANY, "no Serve proxy listens on this node"),
        (details(proxy_location="Disabled", proxies={}), ANY, "Serve runs no HTTP proxy"),
        (details(), LOOPBACK, None),
        (details(proxies={"head": {}}), LOOPBACK, "no Serve proxy listens on this node"),
        (details(), {**ANY, "root_path": "/api"}, "root_path"),
        (details(applications={"llm_app": {"route_prefix": "/llm"}}), ANY, "not at '/'"),
        (details(applications={"llm_app": {"route_prefix": "/"}, "other": {"route_prefix": "/other"}}), ANY, "other applications"),
        (details(applications={"llm_app": {"route_prefix": "/"}, "batch": {"route_prefix": None}}), ANY, None),  # no HTTP route
    ],
)
def test_the_front_door_takes_the_port_only_where_it_can_answer_all_the_proxy_would(instance, http, reason):
    refusal = serve_port.takeover_refusal(instance, http, "llm_app", "node-1")
    assert refusal == reason if reason is None else reason in refusal


def test_serves_enums_count_as_their_values():
    from ray.serve.config import ProxyLocation

    assert serve_port.takeover_refusal(details(proxy_location=ProxyLocation.EveryNode), ANY, "llm_app", "node-1") is None
    assert "no HTTP proxy" in serve_port.takeover_refusal(details(proxy_location=ProxyLocation.Disabled), ANY, "llm_app", "node-1")
