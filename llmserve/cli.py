"""``llmserve run``: serve a config file or one model, with progress, until Ctrl-C.

Imports of Ray and vLLM happen inside the commands, so ``llmserve --help``
answers at once.

Examples::

    llmserve run examples/config.yaml --port 8000
    llmserve run --model Qwen/Qwen2.5-0.5B-Instruct --model-id qwen
    llmserve gen-config            # see llmserve/gen_config.py
    llmserve dashboard --prometheus http://localhost:9090 --out llmserve.png
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Union

from llmserve import access_log  # (standard library only: help still answers at once)

# Ray counts logical CPUs; an engine replica takes one and its worker threads
# use every core anyway, so a small machine needs more logical CPUs than cores.
MIN_LOGICAL_CPUS = 8
DEFAULT_BUILDER = "llmserve:build_openai_app"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gen-config"]:  # its own flags and prompts: llmserve/gen_config.py
        from llmserve import gen_config

        return gen_config.main(argv[1:])
    if argv[:1] == ["dashboard"]:  # llmserve/dashboard.py
        from llmserve import dashboard

        return dashboard.main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "run":
        parser.print_help()
        return 2
    if bool(args.config) == bool(args.model):
        parser.error("give either a CONFIG file or --model, not both or neither")
    return run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmserve", description="Serve LLMs behind one OpenAI-compatible endpoint.")
    commands = parser.add_subparsers(dest="command")
    run_cmd = commands.add_parser("run", help="serve models until Ctrl-C")
    run_cmd.add_argument("config", nargs="?", help="a Serve config YAML (the file `serve run` takes)")
    run_cmd.add_argument("--model", help="serve one model: a local path or Hugging Face id")
    run_cmd.add_argument("--model-id", help="the name clients use for --model (default: the path's last part)")
    run_cmd.add_argument("--host", default=None, help="address to listen on (default: the config's, else 0.0.0.0)")
    run_cmd.add_argument("--port", type=int, default=None, help="port to listen on (default: the config's, else 8000)")
    run_cmd.add_argument(
        "--proxy",
        choices=["llmserve", "haproxy", "ray"],
        default="llmserve",
        help="HTTP front of a Ray this command starts: the ingress listens itself and splices replica "
        "answers (fastest, see docs/data-path.md; for one build_openai_app application, else haproxy), "
        "Serve's HAProxy in front of the ingress, or Serve's Python proxy; a joined cluster keeps its own",
    )
    run_cmd.add_argument(
        "--dashboard",
        action="store_true",
        help="also start Ray's dashboard (needed by `serve status`) with a Ray this command starts; "
        "off by default: its processes cost seconds of CPU at start-up",
    )
    run_cmd.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="require `Authorization: Bearer KEY` on every API route but /health (repeatable; as `vllm serve "
        "--api-key`); LLMSERVE_API_KEY holds keys without putting them on the command line",
    )
    run_cmd.add_argument(
        "--access-log",
        metavar="FILE",
        help="a line per answer (request id, model, adapter, status, tokens, TTFT, duration, replica) appended to "
        "FILE, or shown here with `-`, by every process of a Ray this command starts (else each replica's Serve log)",
    )
    run_cmd.add_argument("--access-log-format", choices=access_log.FORMATS, default="text", help="key=value text or JSON lines")
    run_cmd.add_argument("--ready-timeout", type=float, default=1800, help="seconds to wait for models to load")
    commands.add_parser("gen-config", help="write a model config and a Serve config, from prompts or flags", add_help=False)
    commands.add_parser("dashboard", help="draw the dashboard's panels from a Prometheus to a PNG", add_help=False)
    return parser


def load_serve_config(path: Path) -> dict[str, Any]:
    import yaml

    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    if "applications" not in config:
        raise SystemExit(f"{path}: expected a Serve config with an `applications:` list")
    return config


def build_applications(
    config: dict[str, Any], base_dir: Path, front_door: Union[dict[str, Any], bool, None] = None, api_keys: list[str] = ()
) -> list[tuple[dict[str, Any], Any]]:
    """Each application of a Serve config, built by its import_path (``build_openai_app``
    ones with the ingress listening on ``front_door`` itself, when given, and requiring
    ``api_keys`` besides their own)."""
    from ray._common.utils import import_attr

    from llmserve.builder import build_openai_app, build_openai_app_at

    built = []
    for application in config["applications"]:
        builder = import_attr(application.get("import_path", DEFAULT_BUILDER).replace(":", "."))
        args = application.get("args", {})
        if builder is build_openai_app:
            if api_keys:
                args = {**args, "api_keys": [*args.get("api_keys", []), *api_keys]}
            app = build_openai_app_at(args, base_dir=base_dir, front_door=front_door)
        else:
            app = builder(args) if callable(builder) and not hasattr(builder, "bind") else builder
        built.append((application, app))
    return built


def _single_model_config(model: str, model_id: Optional[str]) -> dict[str, Any]:
    model_id = model_id or Path(model.rstrip("/")).name
    application = {
        "name": "llmserve",
        "route_prefix": "/",
        "import_path": DEFAULT_BUILDER,
        "args": {"llm_configs": [{"model_loading_config": {"model_id": model_id, "model_source": model}}]},
    }
    return {"applications": [application]}


def _can_use_front_door(config: dict[str, Any]) -> bool:
    """One application, built by build_openai_app at `/`: its ingress can own the port."""
    applications = config["applications"]
    return (
        len(applications) == 1
        and applications[0].get("import_path", DEFAULT_BUILDER) in (DEFAULT_BUILDER, "llmserve.build_openai_app")
        and applications[0].get("route_prefix", "/") == "/"
    )


def _ray_is_running() -> bool:
    if os.environ.get("RAY_ADDRESS"):
        return True
    from ray._private.services import find_gcs_addresses

    return bool(find_gcs_addresses())


def _connect_ray(start: bool, dashboard: bool) -> None:
    """Join the running Ray cluster, or start a local one."""
    import ray

    if not start:
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
        return
    cpus = max(os.cpu_count() or 1, MIN_LOGICAL_CPUS)
    print(f"llmserve: starting a local Ray with {cpus} logical CPUs", flush=True)
    ray.init(
        num_cpus=cpus,
        log_to_driver=False,
        include_dashboard=dashboard,
        # Serve's replicas are actors with their own processes: idle task
        # workers started "just in case" only take CPU from loading models.
        _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False, "worker_niceness": 0},
    )


def _configure_local_serve(serve_proxy: str) -> None:
    # Serve reads these at import, in every process of the cluster that
    # ray.init is about to start: set them before anything imports ray.serve.
    # HAProxy hands connections straight to the ingress replicas, saving one
    # Python hop (and its CPU) per streamed chunk.
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if serve_proxy == "haproxy" else "0"
    if serve_proxy == "none":
        # The throughput mode below turns on Serve's direct ingress, which
        # starts a proxy whatever proxy_location says; with our front door it
        # would share the port (both bind with SO_REUSEPORT) and take half the traffic.
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "0"
    # An ingress replica stays reachable this long after it is told to stop,
    # for load balancers outside the node; ours is HAProxy on the same node.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    # Serve's documented throughput mode: a replica runs user code on the
    # event loop that serves its HTTP, instead of handing every streamed
    # chunk between two threads (measured: the largest cost in the ingress).
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")


def _configure_access_log(target: str, log_format: str, started_ray: bool) -> None:
    """Every process of the Ray about to start appends its access lines to one file per node
    (access_log.py); ``-`` has this command show them as they come."""
    if not started_ray:
        print(
            f"llmserve: --access-log applies to a Ray this command starts; on a running cluster set "
            f"{access_log.PATH_ENV} in its environment or the models' runtime_env",
            file=sys.stderr,
            flush=True,
        )
        return
    if target == "-":
        import tempfile

        handle, target = tempfile.mkstemp(prefix="llmserve-access-", suffix=".log")
        os.close(handle)
        threading.Thread(target=_show_lines_of, args=(target,), daemon=True, name="access-log").start()
    os.environ[access_log.PATH_ENV] = str(Path(target).resolve())
    os.environ[access_log.FORMAT_ENV] = log_format


def _show_lines_of(path: str) -> None:
    partial = b""
    with open(path, "rb") as lines:
        while True:
            chunk = lines.read(65536)
            if not chunk:
                time.sleep(0.2)
                continue
            *whole, partial = (partial + chunk).split(b"\n")  # a line still being written waits for its end
            if whole:
                sys.stdout.write("".join(line.decode("utf-8", "replace") + "\n" for line in whole))
                sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    if args.config:
        config_path = Path(args.config).resolve()
        config, base_dir = load_serve_config(config_path), config_path.parent
    else:
        config, base_dir = _single_model_config(args.model, args.model_id), Path.cwd()
    http = config.get("http_options") or {}
    host = args.host or http.get("host") or "0.0.0.0"
    port = args.port or http.get("port") or 8000

    started = time.monotonic()
    _interrupt_on_signals()
    started_ray = not _ray_is_running()
    # A cluster we join keeps its own proxy; one we start gets the fastest front that fits.
    use_front_door = started_ray and args.proxy == "llmserve" and _can_use_front_door(config)
    if started_ray:
        _configure_local_serve("none" if use_front_door else "ray" if args.proxy == "ray" else "haproxy")
    if args.access_log:
        _configure_access_log(args.access_log, args.access_log_format, started_ray)
    # (Serve's own fronts, when asked for, keep every connection.)
    front_door = {"host": host, "port": port} if use_front_door else False if started_ray else None
    applications = build_applications(config, base_dir, front_door, args.api_key)  # config errors surface before Ray starts
    reservation = None
    if started_ray:  # fail now if the port is taken, not after the models load
        from llmserve.front_door import reserve_port

        try:
            reservation = reserve_port(host, port)
        except OSError as exc:
            print(f"llmserve: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr, flush=True)
            return 1
        if not use_front_door:  # Serve's proxy binds the port itself; only the front door needs it held
            reservation.close()
    _connect_ray(start=started_ray, dashboard=args.dashboard)
    from ray import serve

    # With the front door the ingress owns the port, and Serve runs no HTTP proxy.
    serve.start(proxy_location="Disabled" if use_front_door else None, http_options={"host": host, "port": port})
    for application, app in applications:
        name = application.get("name", "default")
        print(f"llmserve: deploying application {name!r}", flush=True)
        # serve.run returns only once every model has loaded; its non-blocking
        # twin lets us show progress meanwhile.
        serve._run(app, _blocking=False, name=name, route_prefix=application.get("route_prefix", "/"))
    try:
        shown: dict[str, str] = {}  # each deployment's last status line
        if not _wait_until_running(args.ready_timeout, started, shown):
            return 1
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        print(f"llmserve: ready in {time.monotonic() - started:.1f}s at http://{shown_host}:{port}/v1", flush=True)
        _show_changes_until_interrupted(started, shown)
        return 0
    finally:
        print("llmserve: shutting down", flush=True)
        _shut_down([application.get("name", "default") for application, _ in applications], started_ray)
        if reservation is not None:
            reservation.close()


def _shut_down(app_names: list[str], started_ray: bool) -> None:
    import ray
    from ray import serve

    try:
        if started_ray:
            serve.shutdown()
        else:  # a shared cluster: remove only what we deployed
            for name in app_names:
                serve.delete(name)
    except Exception as exc:
        # Ctrl-C in a terminal reaches Ray's own processes too; they may be gone already.
        print(f"llmserve: Ray was already stopping ({type(exc).__name__})", file=sys.stderr, flush=True)
    if started_ray:
        ray.shutdown()


# While serving, deployment changes (a replica replaced, scaled, draining) are shown this often.
STATUS_PERIOD_S = 2.0


def _show_deployments(apps: dict[str, Any], last_line: dict[str, str], started: float) -> None:
    """One line per deployment whose replicas changed since ``last_line``."""
    for app in apps.values():
        for name, deployment in app.deployments.items():
            replicas = ", ".join(f"{count} {state.lower()}" for state, count in deployment.replica_states.items())
            line = f"{deployment.status.value.lower()} ({replicas or 'no replicas yet'})"
            if last_line.get(name) != line:
                print(f"llmserve: [{time.monotonic() - started:6.1f}s] {name}: {line}", flush=True)
                last_line[name] = line


def _show_downloads(last_line: dict[str, str], started: float) -> None:
    """A line per model download (weights from a bucket) whose progress changed since ``last_line``."""
    from llmserve.storage import downloads_since

    try:
        downloads = downloads_since(time.time() - (time.monotonic() - started))
    except Exception:  # progress is a courtesy; the deployment status still shows
        return
    for key, line in downloads.items():
        if last_line.get(key) != line:
            print(f"llmserve: [{time.monotonic() - started:6.1f}s] {key.split('@')[0]}: {line}", flush=True)
            last_line[key] = line


def _wait_until_running(timeout: float, started: float, last_line: dict[str, str]) -> bool:
    """Print each deployment's progress until all run; False on failure or timeout."""
    from ray import serve

    while time.monotonic() - started < timeout:
        apps = serve.status().applications
        all_running = bool(apps)
        _show_deployments(apps, last_line, started)
        _show_downloads(last_line, started)
        for app_name, app in apps.items():
            if app.status.value in ("DEPLOY_FAILED", "UNHEALTHY"):
                print(f"llmserve: application {app_name!r} failed: {app.message}", file=sys.stderr, flush=True)
                for name, deployment in app.deployments.items():
                    if deployment.message:  # the replica's own error, with its traceback
                        print(f"llmserve: {name}: {deployment.message}", file=sys.stderr, flush=True)
                return False
            all_running = all_running and app.status.value == "RUNNING"
        if all_running:
            return True
        time.sleep(1)
    print(f"llmserve: models not ready after {timeout:.0f}s", file=sys.stderr, flush=True)
    return False


def _interrupt_on_signals() -> None:
    # SIGTERM (from a process manager) shuts down as cleanly as Ctrl-C, and
    # Ctrl-C works even when started in the background (which ignores SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))


def _show_changes_until_interrupted(started: float, last_line: dict[str, str]) -> None:
    from ray import serve

    try:
        while True:
            try:
                _show_deployments(serve.status().applications, last_line, started)
                _show_downloads(last_line, started)
            except KeyboardInterrupt:
                raise
            except Exception:  # the controller is being replaced: ask again next time
                pass
            time.sleep(STATUS_PERIOD_S)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
