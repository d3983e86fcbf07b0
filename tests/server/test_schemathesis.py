"""Property-based API tests from /openapi.json: for generated requests (valid and invalid) the
server never answers 5xx, and every response matches the documented status codes, content
types and schemas."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import positive_data_acceptance
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode

from tests.server.conftest import API_KEY, MODEL_ID, live_server
from torchchat.server.config import ServerOptions

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            # Invalid requests are refused with 400, or 413 when they are too large to read.
            "negative_data_rejection": {"expected-statuses": [400, 401, 404, 413]},
        }
    }
)


@pytest.fixture(scope="module")
def api_schema():
    # A small token limit keeps each generated completion short.
    opts = ServerOptions(model_id=MODEL_ID, api_key=API_KEY, max_tokens_limit=8, max_n=2)
    with live_server(opts) as srv:
        yield schemathesis.openapi.from_url(srv.url + "/openapi.json", headers=AUTH, config=CONFIG)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_schema(api_schema, mode):
    # Each operation gets its own generated requests. Schemathesis' pytest plugin is not used:
    # its lazy-fixture tests set a pytest attribute that pytest 9.1 removed.
    tested = []
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case):
            # Every check except "schema-valid data must be accepted": some valid-looking
            # requests are refused on purpose (a prompt over the context, turns the chat
            # template cannot render, max_tokens over --max-tokens-limit) and answered 400, as
            # OpenAI does.
            case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Unsatisfiable:
            # An operation without parameters or body has no invalid requests to generate.
            assert mode == GenerationMode.NEGATIVE, operation.label
            continue
        tested.append(operation.label)
    # A path parameter of any string has no invalid value, so that route is tested positively.
    expected = {"POST /v1/chat/completions", "POST /v1/completions"}
    if mode == GenerationMode.POSITIVE:
        expected |= {"GET /v1/models", "GET /v1/models/{model_id}", "GET /health"}
    assert expected <= set(tested), tested
