"""The dashboard's one definition: the Grafana JSON under examples/ is it, and its queries come
out with Grafana's variables filled in. (Every query against a real Prometheus: tests/e2e/test_dashboard.py.)"""

import json

from llmserve.dashboard import PANELS, _legend, grafana_dashboard, panel_queries
from tests.conftest import REPO


def test_the_example_grafana_dashboard_is_the_one_llmserve_draws():
    example = json.loads((REPO / "examples" / "grafana" / "llmserve-dashboard.json").read_text())
    assert example == grafana_dashboard(), "regenerate it: python -m llmserve.dashboard --write-grafana examples/grafana/llmserve-dashboard.json"
    assert [panel["title"] for panel in example["panels"]] == [panel.title for panel in PANELS]


def test_queries_have_every_variable_filled_in():
    queries = panel_queries(grafana_dashboard(), rate_interval="2m", model="tiny", adapter="sql")
    assert len(queries) == len(PANELS)
    for _, targets in queries:
        for expr, _ in targets:
            assert "$" not in expr
    first_expr = queries[0][1][0][0]
    assert first_expr == 'sum by (model, adapter) (rate(ray_llmserve_requests_total{model=~"tiny", adapter=~"sql"}[2m]))'


def test_legends_name_the_series_and_drop_labels_it_lacks():
    assert _legend("p90 {{model}} {{adapter}}", {"model": "qwen", "adapter": "sql"}) == "p90 qwen sql"
    assert _legend("p90 {{model}} {{adapter}}", {"model": "qwen"}) == "p90 qwen"
    assert _legend("{{model}} {{adapter}}", {"model": "", "adapter": ""}) == "(no model)"
