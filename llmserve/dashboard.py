"""The llmserve dashboard: its panels' Prometheus queries, as a Grafana dashboard and as a PNG.

``PANELS`` is the one definition. ``grafana_dashboard()`` is the Grafana JSON
(``examples/grafana/llmserve-dashboard.json`` is it, written by
``python -m llmserve.dashboard --write-grafana PATH``); ``draw()`` asks a
Prometheus for each panel's series over the last minutes and draws them to a
PNG (``llmserve dashboard``), for when no Grafana is at hand. Both read the
series docs/metrics.md describes: ``ray_llmserve_*`` per model and adapter, and
vLLM's ``ray_vllm_*`` per model and replica.

Example::

    llmserve dashboard --prometheus http://localhost:9090 --minutes 30 --out llmserve.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

# Grafana's variables, as the queries use them; draw() puts in their values.
OURS = 'model=~"$model", adapter=~"$adapter"'
ENGINES = 'model_name=~"$model"'
RATE = "[$__rate_interval]"


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str  # Grafana's unit name
    targets: tuple[tuple[str, str], ...]  # (PromQL, legend with {{label}} placeholders)


def _quantiles(series: str, *quantiles: float) -> tuple[tuple[str, str], ...]:
    return tuple(
        (f"histogram_quantile({q}, sum by (le, model, adapter) (rate({series}_bucket{{{OURS}}}{RATE})))", f"p{round(q * 100)} {{{{model}}}} {{{{adapter}}}}")
        for q in quantiles
    )


PANELS = (
    Panel("Answers per second", "reqps", (
        (f"sum by (model, adapter) (rate(ray_llmserve_requests_total{{{OURS}}}{RATE}))", "{{model}} {{adapter}}"),
    )),
    Panel("Tokens per second", "short", (
        (f"sum by (model, adapter) (rate(ray_llmserve_completion_tokens_total{{{OURS}}}{RATE}))", "generated {{model}} {{adapter}}"),
        (f"sum by (model, adapter) (rate(ray_llmserve_prompt_tokens_total{{{OURS}}}{RATE}))", "prompt {{model}} {{adapter}}"),
    )),
    Panel("Time to first token", "s", _quantiles("ray_llmserve_time_to_first_token_seconds", 0.5, 0.9, 0.99)),
    Panel("Time per output token (between tokens)", "s", _quantiles("ray_llmserve_inter_token_latency_seconds", 0.5, 0.9, 0.99)),
    Panel("Request duration", "s", _quantiles("ray_llmserve_request_duration_seconds", 0.5, 0.9)),
    Panel("Errors per second, by status", "reqps", (
        (f'sum by (model, status) (rate(ray_llmserve_requests_total{{{OURS}, status!~"2.."}}{RATE}))', "{{status}} {{model}}"),
    )),
    Panel("Refused: queue full (429) per second", "reqps", (
        (f'sum by (model) (rate(ray_llmserve_rejections_total{{model=~"$model"}}{RATE}))', "{{model}}"),
    )),
    Panel("Queued and running requests", "short", (
        ('sum by (model) (ray_llmserve_requests_queued{model=~"$model"})', "queued in the ingress {{model}}"),
        (f"sum by (model_name) (ray_vllm_num_requests_waiting{{{ENGINES}}})", "waiting in the engines {{model_name}}"),
        (f"sum by (model_name) (ray_vllm_num_requests_running{{{ENGINES}}})", "running {{model_name}}"),
    )),
    Panel("KV cache use, by replica", "percentunit", (
        (f"max by (model_name, ReplicaId) (ray_vllm_kv_cache_usage_perc{{{ENGINES}}})", "{{model_name}} {{ReplicaId}}"),
    )),
)  # fmt: skip


def grafana_dashboard() -> dict[str, Any]:
    """The panels as a Grafana dashboard (import it, pick the Prometheus that scrapes /metrics)."""
    source = {"type": "prometheus", "uid": "${datasource}"}

    def variable(name: str, query: str) -> dict[str, Any]:
        return {
            "name": name, "type": "query", "datasource": source, "query": {"query": query, "refId": name},
            "definition": query, "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2,
            "current": {"text": "All", "value": "$__all"},
        }  # fmt: skip

    panels = []
    for number, panel in enumerate(PANELS):
        panels.append({
            "id": number + 1, "type": "timeseries", "title": panel.title, "datasource": source,
            "gridPos": {"h": 8, "w": 12, "x": number % 2 * 12, "y": number // 2 * 8},
            "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
            "targets": [
                {"refId": chr(ord("A") + index), "datasource": source, "expr": expr, "legendFormat": legend}
                for index, (expr, legend) in enumerate(panel.targets)
            ],
        })  # fmt: skip
    return {
        "title": "llmserve", "uid": "llmserve", "schemaVersion": 39, "version": 1, "editable": True,
        "refresh": "10s", "time": {"from": "now-30m", "to": "now"}, "tags": ["llmserve", "vllm"],
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"},
            variable("model", "label_values(ray_llmserve_requests_total, model)"),
            variable("adapter", 'label_values(ray_llmserve_requests_total{model=~"$model"}, adapter)'),
        ]},
        "panels": panels,
    }  # fmt: skip


def panel_queries(dashboard: dict[str, Any], rate_interval: str = "1m", model: str = ".*", adapter: str = ".*") -> list[tuple[str, list[tuple[str, str]]]]:
    """Each panel of a Grafana dashboard: its title and its (PromQL, legend) with the variables filled in."""
    values = {"$__rate_interval": rate_interval, "$model": model, "$adapter": adapter}

    def filled(expr: str) -> str:
        for name, value in values.items():
            expr = expr.replace(name, value)
        return expr

    return [
        (panel["title"], [(filled(target["expr"]), target.get("legendFormat", "")) for target in panel.get("targets", [])])
        for panel in dashboard["panels"]
        if panel.get("type") == "timeseries"
    ]


def query(prometheus: str, promql: str, start: Optional[float] = None, end: Optional[float] = None, step: float = 0) -> list[dict[str, Any]]:
    """Prometheus's answer to ``promql``: instant at now, or a range from ``start`` to ``end`` every ``step`` s."""
    if start is None:
        url = f"{prometheus.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    else:
        url = f"{prometheus.rstrip('/')}/api/v1/query_range?" + urllib.parse.urlencode({"query": promql, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(url, timeout=30) as response:
        answer = json.load(response)
    if answer.get("status") != "success":
        raise RuntimeError(f"Prometheus refused {promql!r}: {answer.get('error')}")
    return answer["data"]["result"]


def draw(prometheus: str, out: Path, minutes: float = 15, dashboard: Optional[dict[str, Any]] = None, rate_interval: str = "1m") -> int:
    """The dashboard's panels over the last ``minutes``, from ``prometheus``, as one PNG; the number of lines drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates
    import matplotlib.pyplot as plt
    from datetime import datetime

    panels = panel_queries(dashboard or grafana_dashboard(), rate_interval)
    end = time.time()
    start = end - minutes * 60
    step = max(1.0, minutes * 60 / 240)
    rows = math.ceil(len(panels) / 2)
    figure, axes = plt.subplots(rows, 2, figsize=(15, 3.4 * rows), squeeze=False)
    drawn = 0
    for axis, (title, targets) in zip(axes.flat, panels):
        for expr, legend in targets:
            for series in query(prometheus, expr, start, end, step):
                points = [(float(t), float(v)) for t, v in series["values"] if math.isfinite(float(v))]
                if points:
                    times = [datetime.fromtimestamp(t) for t, _ in points]
                    axis.plot(times, [v for _, v in points], label=_legend(legend, series["metric"]))
                    drawn += 1
        axis.set_title(title, fontsize=10, loc="left")
        axis.xaxis.set_major_formatter(matplotlib.dates.DateFormatter("%H:%M:%S"))
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=6, loc="upper left")
        else:
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes, color="grey")
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle(f"llmserve — {datetime.fromtimestamp(start):%H:%M:%S} to {datetime.fromtimestamp(end):%H:%M:%S}", fontsize=12)
    figure.tight_layout()
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return drawn


def _legend(template: str, labels: dict[str, str]) -> str:
    for name, value in labels.items():
        template = template.replace("{{" + name + "}}", value)
    while "{{" in template:  # a label this series lacks (the base model has no adapter)
        head, _, rest = template.partition("{{")
        template = head + rest.partition("}}")[2]
    # Answers refused before a model was known (an unknown model, an unreadable body) have model="".
    return " ".join(template.split()) or "(no model)"


def main(argv: Optional[list[str]] = None) -> int:
    cli = argparse.ArgumentParser(prog="llmserve dashboard", description="Draw the llmserve dashboard from a Prometheus to a PNG.")
    cli.add_argument("--prometheus", default="http://localhost:9090", help="the Prometheus that scrapes /metrics")
    cli.add_argument("--minutes", type=float, default=15, help="how far back to draw")
    cli.add_argument("--out", default="llmserve-dashboard.png", help="the PNG to write")
    cli.add_argument("--grafana", help="draw this Grafana dashboard JSON instead of llmserve's own")
    cli.add_argument("--write-grafana", metavar="PATH", help="write llmserve's dashboard as Grafana JSON to PATH, and draw nothing")
    args = cli.parse_args(argv)
    if args.write_grafana:
        Path(args.write_grafana).write_text(json.dumps(grafana_dashboard(), indent=2) + "\n")
        return 0
    dashboard = json.loads(Path(args.grafana).read_text()) if args.grafana else None
    try:
        drawn = draw(args.prometheus, Path(args.out), args.minutes, dashboard)
    except OSError as exc:
        print(f"llmserve dashboard: cannot ask {args.prometheus}: {exc}", file=sys.stderr)
        return 1
    print(f"llmserve dashboard: {drawn} series drawn to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
