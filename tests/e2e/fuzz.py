"""Schemathesis against a running app, from the app's own `/openapi.json`.

Every operation gets requests generated from its schema, valid and invalid
(schemathesis's positive and negative modes), with the body's `model` often
set to one of the served models so the requests reach the engines instead of
stopping at the 404 for an unknown model. A request fails the run when its
answer is a 5xx, a 4xx outside the OpenAI error envelope, or nothing within
the timeout. Failures are collected, not raised inside hypothesis, so one
bad answer does not cost a shrinking search.

Example::

    report = fuzz("http://127.0.0.1:8000", models=["tiny"], examples_per_operation=20)
    assert report.requests >= 300 and not report.failures
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import requests

TIMEOUT_S = 60
ENVELOPE_FIELDS = {"message", "type", "param", "code"}


@dataclasses.dataclass
class FuzzReport:
    requests: int = 0
    by_status: dict[int, int] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)


def fuzz(base_url: str, *, models: list[str], examples_per_operation: int, seed: int = 0) -> FuzzReport:
    import hypothesis
    import hypothesis.errors
    import schemathesis
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    document = requests.get(base_url + "/openapi.json", timeout=TIMEOUT_S).json()
    schema = schemathesis.openapi.from_dict(document)
    report = FuzzReport()
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            cases = st.tuples(operation.as_strategy(generation_mode=mode), st.sampled_from([None, *models]))

            @hypothesis.settings(
                max_examples=examples_per_operation,
                deadline=None,
                database=None,
                derandomize=False,
                phases=[hypothesis.Phase.generate],
                suppress_health_check=list(hypothesis.HealthCheck),
            )
            @hypothesis.seed(seed)
            @hypothesis.given(cases)
            def one_request(drawn: tuple[Any, Any]) -> None:
                case, model = drawn
                if model is not None and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = model
                _check(report, operation.label, case, session, base_url)

            try:
                one_request()
            except hypothesis.errors.Unsatisfiable:
                pass  # no invalid request exists (an operation without parameters or body)
    return report


def _check(report: FuzzReport, label: str, case: Any, session: requests.Session, base_url: str) -> None:
    report.requests += 1
    try:
        response = case.call(base_url=base_url, session=session, timeout=TIMEOUT_S)
    except requests.RequestException as exc:
        report.failures.append(f"{label}: no answer ({exc!r}) to {_shown(case)}")
        return
    status = response.status_code
    report.by_status[status] = report.by_status.get(status, 0) + 1
    if status >= 500:
        report.failures.append(f"{label}: {status} {response.text[:300]} for {_shown(case)}")
    elif status >= 400:
        try:
            error = response.json()["error"]
            enveloped = set(error) == ENVELOPE_FIELDS and isinstance(error["message"], str)
        except (ValueError, KeyError, TypeError):
            enveloped = False
        if not enveloped:
            report.failures.append(f"{label}: {status} outside the OpenAI envelope: {response.text[:300]}")


def _shown(case: Any) -> str:
    try:
        return json.dumps(case.body, default=repr)[:500]
    except (TypeError, ValueError):
        return repr(case.body)[:500]
