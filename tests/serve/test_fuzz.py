"""schemathesis (pinned) over the server's own OpenAPI schema: generated requests, valid and not, never get
a 5xx, requests the schema forbids are refused (not silently accepted), and every status is documented.

(Not checked: that every schema-valid request is accepted. A request can satisfy the schema and still be
refused for what the schema cannot say: max_tokens beyond this model's context, a model name not served.)"""

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (after the skip)
from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,  # noqa: E402
                                 status_code_conformance)

from lmstack.serve.app import create_app  # noqa: E402
from tests.serve.conftest import make_server  # noqa: E402


@pytest.fixture(scope="module")
def app(chat_model_dir):
    server = make_server(chat_model_dir, embed=lambda texts: (__import__("torch").ones(len(texts), 4), 0))
    yield create_app(server)
    server.runner.stop()


def test_no_generated_request_gets_a_server_error(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []
    for operation in schema.get_all_operations():
        operation = operation.ok()

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)
        @given(case=operation.as_strategy())
        def check(case):
            case.call_and_validate(checks=[not_a_server_error, negative_data_rejection, status_code_conformance,
                                           content_type_conformance])

        try:
            check()
        except Exception as error:  # collect every operation's failure, then report them together
            failures.append(f"{operation.label}: {error}")
    assert not failures, "\n\n".join(failures)
