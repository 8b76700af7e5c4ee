"""Schema-constrained decoding: the schemas this decoder enforces (and clear errors for the rest), texts that
validate accepted and others refused, and `client.chat.completions.parse` against the server."""

import json
from typing import Literal

import openai
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from lmstack.serve.app import create_app
from lmstack.serve.json_schema import SchemaPrefix, check_schema
from tests.serve.conftest import make_server

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"enum": ["red", "blue"]}},
                                           "pet": {"type": ["string", "null"]}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("text", ['{"name": "Ann", "age": 31}', '{"name":"","age":0,"tags":["red","blue"]}',
                                  '{"name": "x", "age": -7, "pet": null}', '{"name": "x", "age": 1, "tags": []}'])
def test_valid_documents_are_accepted(text):
    state = SchemaPrefix(PERSON)
    assert state.feed(text) and state.complete


@pytest.mark.parametrize("text", ['{"age": 31, "name": "Ann"}',  # out of order
                                  '{"name": "Ann"}',  # age is required
                                  '{"name": "Ann", "age": 3.5}', '{"name": "Ann", "age": -0}',
                                  '{"name": 5, "age": 1}', '{"name": "a", "age": 1, "extra": 1}',
                                  '{"name": "a", "age": 1, "tags": ["green"]}', '{"name": "a", "age": 1, "pet": true}',
                                  '{"name": "a", "age": 1,}', '[]'])
def test_invalid_documents_are_refused(text):
    state = SchemaPrefix(PERSON)
    assert not (state.feed(text) and state.complete)


@pytest.mark.parametrize("schema,message", [
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "x+"}}}, "'pattern' is not supported"),
    ({"type": "object", "additionalProperties": True}, "additionalProperties must be false"),
    ({"type": "object", "properties": {}, "required": ["a"]}, "required must list names"),
    ({"type": "object", "properties": {"a": {"type": "string", "enum": [1, 2]}}}, "enum / const"),
    ({"type": "object", "properties": {"a": {"type": "date"}}}, "type must be one of"),
    ({"type": "object", "properties": {"a\"b": {"type": "string"}}}, "needs escaping"),
    ([], "must be an object"),
])
def test_unsupported_schemas_are_clear_errors(schema, message):
    with pytest.raises(ValueError, match=message):
        check_schema(schema)


class Answer(BaseModel):
    ok: bool
    colour: Literal["red", "blue"]
    count: int


@pytest.fixture(scope="module")
def client(chat_model_dir):
    server = make_server(chat_model_dir)
    with TestClient(create_app(server)) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0, http_client=http), http
    server.runner.stop()


def test_parse_returns_an_object_of_the_schema(client, chat_model_dir):
    openai_client, _ = client
    from lmstack.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(chat_model_dir)
    # A random model could write digits or blanks until max_tokens: keep it to "0" and no whitespace.
    texts = {i: tokenizer.decode([i]) for i in range(tokenizer.vocab_size)}
    ban = {str(i): -100 for i, t in texts.items() if t and (t[0] in "123456789-" or not t.strip())}
    reply = openai_client.chat.completions.parse(model="tiny-chat", messages=[{"role": "user", "content": "Go"}],
                                                 response_format=Answer, max_tokens=80, temperature=0,
                                                 logit_bias=ban)
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, Answer) and parsed.colour in ("red", "blue")
    assert Answer.model_validate(json.loads(reply.choices[0].message.content)) == parsed


def test_a_schema_the_decoder_cannot_enforce_is_a_400(client):
    _, http = client
    body = {"messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                "properties": {"a": {"type": "string", "format": "date"}}}}}}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"
    assert "'format' is not supported" in response.json()["error"]["message"]
    body["response_format"]["json_schema"].pop("schema")
    assert "schema is required" in http.post("/v1/chat/completions", json=body).json()["error"]["message"]
