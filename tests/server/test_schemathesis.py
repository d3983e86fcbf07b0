"""Property-based API tests from /openapi.json: for generated requests (valid and invalid) the
server never answers 5xx, and every response matches the documented status codes, content
types and schemas."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance
from schemathesis.config import SchemathesisConfig

from server.conftest import API_KEY, MODEL_ID, live_server
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


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_schema(case):
    # Every check except "schema-valid data must be accepted": some valid-looking requests are
    # refused on purpose (a prompt over the context, turns the chat template cannot render,
    # max_tokens over --max-tokens-limit) and answered 400, as OpenAI does.
    case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])
