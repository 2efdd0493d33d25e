"""The ingress takes its node's share of Serve's HTTP port from Serve's proxy.

`serve run config.yaml`, `serve deploy` (what a RayService does) and `serve.run(...)`
start Serve's HTTP proxy on host:port (``http_options``) before any application code
runs, and Serve cannot be told to stop it afterwards: ``proxy_location`` and
``http_options`` are fixed when Serve starts. Behind that proxy every streamed chunk
crosses the proxy, a Ray call and the relay (0.81x `vllm serve`'s throughput and 1.9x
its P99 ITL, against 0.98x under `llmserve run`, whose ingress owns the port).

The proxy listens with SO_REUSEPORT, and Linux gives a new connection to the listener
bound most precisely to where it is going: one bound to the address itself before one
bound to the wildcard address, whichever was bound first; and among listeners of one
address, a group bound to its interface is a group of its own, asked before the
proxy's when it was bound later. So the ingress's front door listens on the same port:

- on each IPv4 address of the node, where the proxy listens on 0.0.0.0 (Serve's default
  in config files, hence `serve run` and RayService);
- on the proxy's own address, bound to that address's interface, where the proxy
  listens on one address (``serve.run``'s default, 127.0.0.1).

Serve's proxy keeps running, healthy in Serve's eyes; while the front door is open it
gets no connection on this node, and once the front door closes (the ingress replica
stops, moves or dies) it gets them all again by itself. Nodes without an ingress replica
keep Serve's proxy, whose path stays as it was.

The front door takes the port only where it can answer everything the proxy would: one
HTTP application, this one, at ``/``, with no root path. Anything else keeps Serve's
proxy, with the reason in the replica's log.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from typing import Any, Optional

from llmserve.front_door import BACKLOG

logger = logging.getLogger("llmserve")

ANY_IPV4 = ("", "0.0.0.0")


def interfaces_by_address() -> dict[str, str]:
    """Each IPv4 address of this node, with the name of its interface."""
    import psutil

    return {entry.address: name for name, entries in psutil.net_if_addrs().items() for entry in entries if entry.family == socket.AF_INET}


def shadowing_addresses(proxy_host: str, interfaces: dict[str, str]) -> list[tuple[str, Optional[str]]]:
    """Where a listener takes the connections a proxy listening on ``proxy_host`` would get:
    (address, interface to bind to, or None). Empty where there is no such place (IPv6)."""
    if proxy_host in ANY_IPV4:
        return [(address, None) for address in sorted(interfaces)]
    try:
        address = ipaddress.ip_address(socket.gethostbyname(proxy_host))
    except (OSError, ValueError):
        return []
    if address.version != 4 or str(address) not in interfaces:
        return []
    return [(str(address), interfaces[str(address)])]


def listen_before(addresses: list[tuple[str, Optional[str]]], port: int) -> list[socket.socket]:
    """Listening sockets on ``port`` at ``addresses``, ahead of the proxy's; all or none (OSError)."""
    listeners: list[socket.socket] = []
    try:
        for address, interface in addresses:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listeners.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # Shared with the proxy (it sets SO_REUSEPORT too) and with this node's other ingress replicas.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if interface is not None:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            listener.bind((address, port))
            listener.listen(BACKLOG)
            listener.setblocking(False)
    except OSError:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def takeover_refusal(details: dict[str, Any], http: dict[str, Any], app_name: str, node_id: str) -> Optional[str]:
    """Why the front door must leave the port to Serve's proxy on this node (None: it may
    take it), from the controller's ``get_serve_instance_details`` and ``get_http_config``."""
    if sys.platform != "linux":
        return "the front door takes the port from Serve's proxy on Linux only"
    location = _plain(details.get("proxy_location"))
    if location in (None, "Disabled"):
        return "Serve runs no HTTP proxy"
    if http.get("root_path"):
        return "Serve's http_options set a root_path"
    routes = {name: app.get("route_prefix") for name, app in (details.get("applications") or {}).items()}
    if routes.get(app_name) != "/":
        return f"this application is at {routes.get(app_name)!r}, not at '/'"
    others = sorted(name for name, prefix in routes.items() if name != app_name and prefix is not None)
    if others:
        return f"other applications have HTTP routes ({', '.join(others)}): Serve's proxy routes between them"
    proxy_here = node_id in (details.get("proxies") or {})
    if http.get("host") in ANY_IPV4:
        # (Listeners on each address take the connections whether Serve's proxy binds before or after them.)
        return None if proxy_here or location == "EveryNode" else "no Serve proxy listens on this node"
    # On one address, the front door must come after the proxy (which binds before Serve
    # deploys anything, on the one node that has that address).
    return None if proxy_here else "no Serve proxy listens on this node"


def _plain(value: Any) -> Any:
    """An enum of Serve's (ProxyLocation, ProxyStatus) as its plain value."""
    return getattr(value, "value", value)


# How often an ingress replica looks again (another application deployed, Serve's proxy up).
RECHECK_S = 10.0
# Serve's http_options, as its controller says: fixed once Serve starts, so asked once per replica.
_serve_http: Optional[dict[str, Any]] = None


async def takeover_plan(app_name: str) -> tuple[list[tuple[str, Optional[str]]], int, Optional[str]]:
    """Where this replica's front door may listen to take Serve's HTTP port on its node
    (shadowing_addresses), the port, and the reason where nowhere."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    details = await controller.get_serve_instance_details.remote()
    global _serve_http
    if _serve_http is None:
        # (The details leave out options set by default, such as serve.run's host.)
        options = await controller.get_http_config.remote()
        _serve_http = {"host": options.host, "port": options.port, "root_path": options.root_path}
    http = _serve_http
    host, port = http["host"], int(http["port"])
    refusal = takeover_refusal(details, http, app_name, ray.get_runtime_context().get_node_id())
    if refusal is not None:
        return [], port, refusal
    addresses = shadowing_addresses(host, interfaces_by_address())
    if not addresses:
        return [], port, f"no IPv4 address of this node to take {host}:{port} on"
    return addresses, port, None
