"""SDK pieces that need no server: retries with backoff, error mapping, splitting big calls, conversions."""

from __future__ import annotations

import grpc
import pytest
from sieve_client import InvalidArgument, NotFound, ResourceExhausted, RetryPolicy, SieveClient
from sieve_client import _convert as cv
from sieve_client._channel import health_request, health_status
from sieve_client.errors import from_rpc_error


class FakeError(grpc.RpcError):
    def __init__(self, code, details="nope"):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class Flaky:
    def __init__(self, failures):
        self.failures = list(failures)
        self.calls = 0
        self.timeouts = []

    def __call__(self, request, timeout=None, metadata=None):
        self.calls += 1
        self.timeouts.append(timeout)
        if self.failures:
            raise FakeError(self.failures.pop(0))
        return "ok"


@pytest.fixture
def client(monkeypatch):
    c = SieveClient("127.0.0.1:1", retry=RetryPolicy(attempts=4, initial_s=0.001, max_s=0.002), timeout=5)
    monkeypatch.setattr("time.sleep", lambda s: None)
    yield c
    c.close()


def test_retries_unavailable_and_resource_exhausted_then_succeeds(client):
    flaky = Flaky([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
    assert client._call(flaky, None) == "ok"
    assert flaky.calls == 3
    assert all(0 < t <= 5 for t in flaky.timeouts)


def test_gives_up_after_the_attempts_with_a_typed_error(client):
    flaky = Flaky([grpc.StatusCode.RESOURCE_EXHAUSTED] * 10)
    with pytest.raises(ResourceExhausted):
        client._call(flaky, None)
    assert flaky.calls == 4


def test_other_errors_are_not_retried(client):
    flaky = Flaky([grpc.StatusCode.INVALID_ARGUMENT])
    with pytest.raises(InvalidArgument, match="nope"):
        client._call(flaky, None)
    assert flaky.calls == 1


def test_backoff_grows_and_is_capped():
    policy = RetryPolicy(initial_s=0.1, max_s=1.0, multiplier=2.0)
    assert max(policy.delay(1) for _ in range(200)) <= 0.1
    assert max(policy.delay(3) for _ in range(200)) <= 0.4
    assert max(policy.delay(10) for _ in range(200)) <= 1.0
    assert max(policy.delay(10) for _ in range(200)) > 0.5


def test_error_mapping():
    e = from_rpc_error(FakeError(grpc.StatusCode.NOT_FOUND, "collection 'x' does not exist"))
    assert isinstance(e, NotFound) and e.code == grpc.StatusCode.NOT_FOUND and "'x'" in str(e)
    assert type(from_rpc_error(FakeError(grpc.StatusCode.DATA_LOSS))).__name__ == "SieveError"


def test_chunks_keep_order_and_respect_both_limits():
    texts = [f"t{i}" * (1 + i % 5) for i in range(50)]
    parts = cv.chunks(texts, 8, 10_000)
    assert [t for p in parts for t in p] == texts and max(map(len, parts)) == 8
    parts = cv.chunks(["x" * 100] * 10, 100, 250)
    assert [len(p) for p in parts] == [2, 2, 2, 2, 2]
    assert cv.chunks(["y" * 1000], 10, 100) == [["y" * 1000]]  # one oversize text still goes (the server says why)


def test_options_and_documents_conversion():
    o = cv.embed_options(pooling="last", dim=8, precision="binary", truncate=False)
    assert (o.pooling, o.dim, o.precision, o.truncate, o.HasField("instruction")) == (2, 8, 3, False, False)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        cv.embed_options(pooling="max")
    d = cv.document(("d1", "text", {"lang": "en", "n": 3}))
    assert (d.id, d.text, d.metadata["lang"], d.metadata["n"]) == ("d1", "text", "en", 3.0)
    assert cv.document({"id": 7, "text": "t"}).id == "7"
    with pytest.raises(TypeError):
        cv.texts_of("a single string")


def test_hand_encoded_health_messages_match_grpc_health():
    from grpc_health.v1 import health_pb2

    req = health_pb2.HealthCheckRequest(service="sieve.v1.EmbedService").SerializeToString()
    assert health_request("sieve.v1.EmbedService") == req and health_request("") == b""
    for status, name in ((1, "SERVING"), (2, "NOT_SERVING"), (0, "UNKNOWN")):
        assert health_status(health_pb2.HealthCheckResponse(status=status).SerializeToString()) == name
