"""`m3lite serve` as a real subprocess on a free port, with real HTTP clients (urllib, raw sockets)."""
from __future__ import annotations

import base64
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import m3lite

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a volcano?"}]

# what the `openai` Python package (v1) sends, besides the body: its own headers on every request
OPENAI_HEADERS = {"Content-Type": "application/json", "Accept": "application/json",
                  "User-Agent": "OpenAI/Python 1.54.4", "X-Stainless-Lang": "python",
                  "X-Stainless-Package-Version": "1.54.4", "X-Stainless-OS": "Linux", "X-Stainless-Arch": "x64",
                  "X-Stainless-Runtime": "CPython", "X-Stainless-Runtime-Version": "3.11.7",
                  "X-Stainless-Retry-Count": "0", "Authorization": "Bearer sk-no-key-needed",
                  "Accept-Encoding": "gzip, deflate", "Connection": "keep-alive"}


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory):
    model, bank = chat_model
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "m3lite", "serve", "--model", str(model), "--bank", str(bank),
                              "--port", "0"], stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 300
    while not (m := re.search(r"http://127\.0\.0\.1:(\d+)/v1", log.read_text())):
        assert p.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    yield f"http://127.0.0.1:{m.group(1)}", p
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


def request(url: str, path: str, body=None, headers: dict | None = None, method: str | None = None,
            raw: bytes | None = None) -> tuple[int, dict, bytes]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post(url: str, path: str, body, **kw) -> dict:
    status, _, data = request(url, path, body, **kw)
    assert status == 200, data
    return json.loads(data)


def events(data: bytes) -> list:
    """The server-sent events of a stream: JSON objects, then the string "[DONE]" last."""
    out = []
    for block in data.decode().split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def alive(url: str) -> None:
    status, _, data = request(url, "/health")
    assert status == 200 and json.loads(data)["status"] == "ok"


def test_models(server):
    url, _ = server
    out = post(url, "/v1/models", None, method="GET")
    card = out["data"][0]
    assert out["object"] == "list" and card["object"] == "model" and card["m3lite"]["references"] == 3
    assert post(url, f"/v1/models/{card['id']}", None, method="GET")["id"] == card["id"]


def test_chat_completion_streaming_and_not(server):
    url, _ = server
    body = {"model": "m3lite", "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    full = post(url, "/v1/chat/completions", body)
    assert full["object"] == "chat.completion"
    msg = full["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    assert full["choices"][0]["finish_reason"] in ("stop", "length")
    assert full["usage"]["completion_tokens"] <= 12 and full["usage"]["prompt_tokens"] > 0
    refs = full["m3lite"]["references"]
    assert full["m3lite"]["mode"] == "memory" and "volcano" in refs[0]["doc_id"] and "attention" in refs[0]

    status, headers, data = request(url, "/v1/chat/completions", dict(body, stream=True))
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    ev = events(data)
    assert ev[-1] == "[DONE]" and all(e["object"] == "chat.completion.chunk" for e in ev[:-1])
    assert ev[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in ev[:-1])
    assert text == msg["content"]  # greedy: the same answer either way
    final = ev[-2]
    assert final["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert [r["id"] for r in final["m3lite"]["references"]] == [r["id"] for r in refs]


def test_multi_turn_messages_and_modes(server):
    url, _ = server
    history = MESSAGES + [{"role": "assistant", "content": "A mountain of fire."},
                          {"role": "user", "content": [{"type": "text", "text": "Where is Etna?"}]}]
    out = post(url, "/v1/chat/completions", {"messages": history, "max_tokens": 6, "temperature": 0,
                                             "m3lite": {"mode": "rag"}})
    assert out["m3lite"]["mode"] == "rag" and out["m3lite"]["references"]
    assert out["usage"]["prompt_tokens"] > post(url, "/v1/chat/completions", {
        "messages": history[-1:], "max_tokens": 6, "temperature": 0, "m3lite": {"mode": "rag"}})["usage"][
        "prompt_tokens"]
    none = post(url, "/v1/chat/completions", {"messages": history, "max_tokens": 6, "m3lite": {"mode": "none"}})
    assert none["m3lite"]["mode"] == "none" and none["m3lite"]["references"] == []


def test_openai_client_request_shape(server, chat_model):
    """The JSON and headers the `openai` package sends (client.chat.completions.create(..., stream=True,
    stream_options={"include_usage": True}, extra_body={"m3lite": {...}}) and client.embeddings.create, whose
    default encoding_format is base64)."""
    url, _ = server
    body = {"messages": MESSAGES, "model": "m3lite", "max_tokens": 8, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0, "top_p": 1, "seed": 1,
            "m3lite": {"mode": "memory"}}
    status, headers, data = request(url, "/v1/chat/completions", body, headers=OPENAI_HEADERS)
    assert status == 200
    ev = events(data)
    usage = ev[-2]
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == (
        usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"])
    assert all(set(e) >= {"id", "object", "created", "model", "choices"} for e in ev[:-1])

    out = post(url, "/v1/embeddings", {"input": ["volcano lava", "bread"], "model": "m3lite",
                                       "encoding_format": "base64"}, headers=OPENAI_HEADERS)
    vecs = [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in out["data"]]
    model_dir, bank = chat_model
    m = m3lite.load(model_dir)
    from m3lite.retrieval import bank_embedder

    want = bank_embedder(m3lite.Bank.open(bank))(["volcano lava", "bread"])
    np.testing.assert_allclose(np.stack(vecs), want, atol=1e-6)
    plain = post(url, "/v1/embeddings", {"input": "volcano lava"})
    np.testing.assert_allclose(plain["data"][0]["embedding"], want[0], atol=1e-6)
    ids = post(url, "/v1/embeddings", {"input": m.tokenizer.encode("volcano lava")})  # token ids work too
    np.testing.assert_allclose(ids["data"][0]["embedding"], want[0], atol=1e-5)
    assert out["usage"]["prompt_tokens"] > 0


def test_completions_match_the_library(server, chat_model):
    url, _ = server
    out = post(url, "/v1/completions", {"prompt": "Mount Etna is", "max_tokens": 6, "temperature": 0})
    assert out["object"] == "text_completion"
    m = m3lite.load(chat_model[0])
    want = m.generate("Mount Etna is", max_new_tokens=6, temperature=0, bank=chat_model[1], mode="memory")
    assert out["choices"][0]["text"] == want and out["m3lite"]["references"]
    status, _, data = request(url, "/v1/completions", {"prompt": ["Mount Etna is"], "max_tokens": 6,
                                                       "temperature": 0, "stream": True})
    ev = events(data)
    assert "".join(e["choices"][0]["text"] for e in ev[:-1]) == want and ev[-1] == "[DONE]"


def test_bank_search(server):
    url, _ = server
    out = post(url, "/v1/banks/search", {"query": "Mount Etna volcano lava", "k": 2, "retriever": "dense"})
    assert len(out["data"]) == 2 and "volcano" in out["data"][0]["doc_id"]
    assert out["data"][0]["score"] >= out["data"][1]["score"] and "Etna" in out["data"][0]["text"]
    for r in ("dense", "lexical", "hybrid"):
        one = post(url, "/v1/banks/search", {"query": "Mount Etna volcano lava", "k": 1, "retriever": r})
        assert len(one["data"]) == 1 and "volcano" in one["data"][0]["doc_id"], r


BAD = [  # (path, body or raw bytes, status, param)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"\xff\xfe", 400, None),
    ("/v1/chat/completions", [1, 2], 400, None),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": True}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 500}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stop": 7}, 400, "stop"),
    ("/v1/chat/completions", {"messages": MESSAGES, "model": 3}, 400, "model"),
    ("/v1/chat/completions", {"messages": MESSAGES, "m3lite": {"mode": "telepathy"}}, 400, "m3lite.mode"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 511}, 400, "max_tokens"),
    ("/v1/embeddings", {"input": {"text": "x"}}, 400, "input"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
    ("/v1/embeddings", {"input": [99999]}, 400, "input"),
    ("/v1/banks/search", {"query": ""}, 400, "query"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "   "}]}, 400, "messages"),
    ("/v1/banks/search", {"query": "x", "k": 0}, 400, "k"),
    ("/v1/banks/search", {"query": "x", "retriever": "psychic"}, 400, "retriever"),
    ("/v1/nothing", {"x": 1}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD)
def test_malformed_requests_get_4xx(server, path, body, status, param):
    url, _ = server
    raw = body if isinstance(body, bytes) else None
    got, headers, data = request(url, path, None if raw else body, raw=raw)
    err = json.loads(data)["error"]
    assert got == status and set(err) == {"message", "type", "param", "code"}, (got, err)
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    alive(url)


def test_transport_errors(server):
    url, _ = server
    status, _, data = request(url, "/v1/chat/completions", raw=b" " * ((1 << 20) + 1) + b"{}")
    assert status == 413 and json.loads(data)["error"]["code"] == "request_too_large"
    status, _, data = request(url, "/v1/chat/completions", method="GET")
    assert status == 405
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:  # no Content-Length
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):  # the server closes the connection after the error
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 411") and '"error"' in reply
    alive(url)


def test_client_leaving_mid_stream(server):
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"messages": MESSAGES, "max_tokens": 400, "stream": True, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    out = post(url, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3, "temperature": 0})
    assert out["choices"][0]["message"]["role"] == "assistant"


def test_twenty_concurrent_requests(server):
    url, _ = server
    prompts = ["What is a volcano?", "Where does the Nile flow?"]

    def body(i: int) -> dict:
        return {"messages": [{"role": "user", "content": prompts[i % 2]}], "max_tokens": 10, "temperature": 0,
                "stream": i % 4 == 1}

    expected = [post(url, "/v1/chat/completions", dict(body(i), stream=False))["choices"][0]["message"]["content"]
                for i in (0, 1)]
    answers: dict[int, str] = {}
    errors: list = []

    def client(i: int) -> None:
        try:
            status, _, data = request(url, "/v1/chat/completions", body(i))
            assert status == 200, data
            if body(i)["stream"]:
                answers[i] = "".join(e["choices"][0]["delta"].get("content", "") for e in events(data)[:-1])
            else:
                answers[i] = json.loads(data)["choices"][0]["message"]["content"]
        except BaseException as e:  # noqa: BLE001  (reported below, in the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    assert len(answers) == 20 and all(answers[i] == expected[i % 2] for i in range(20))
    alive(url)


def test_the_openai_package(server):
    """The real client, where it is installed (the tests above send its requests by hand)."""
    openai = pytest.importorskip("openai")
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0)
    reply = client.chat.completions.create(model="m3lite", messages=MESSAGES, max_tokens=8, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.model_extra["m3lite"]["references"]
    chunks = list(client.chat.completions.create(model="m3lite", messages=MESSAGES, max_tokens=8, temperature=0,
                                                 stream=True, extra_body={"m3lite": {"mode": "memory"}}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    emb = client.embeddings.create(model="m3lite", input=["volcano lava"])  # base64 on the wire
    assert len(emb.data[0].embedding) == 64  # the tiny model's width
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m3lite", messages=MESSAGES, max_tokens=100000)


def test_startup_errors_are_one_line(server, chat_model, tmp_path):
    from clitools import one_line_error, run

    url, _ = server
    port = url.rsplit(":", 1)[1]
    model, bank = chat_model
    assert "choose another --port" in one_line_error(run("serve", "--model", model, "--port", port, check=False))
    one_line_error(run("serve", "--model", tmp_path / "missing", check=False))
    one_line_error(run("serve", "--model", model, "--mode", "memory", check=False))  # memory needs a bank


def test_a_bank_with_lazy_vectors_gets_them_between_requests(chat_model, notes_dir, tmp_path):
    from clitools import run
    from m3lite.bank import Bank

    model, _ = chat_model
    bank = tmp_path / "lazyvec"
    run("bank", "build", notes_dir, "--out", bank, "--model", model, "--vectors", "lazy")
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "m3lite", "serve", "--model", str(model), "--bank", str(bank),
                              "--port", "0"], stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while not (m := re.search(r"http://127\.0\.0\.1:(\d+)/v1", log.read_text())):
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert "no sentence vector yet" in log.read_text()
        url = f"http://127.0.0.1:{m.group(1)}"
        out = post(url, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4})  # served meanwhile
        assert out["choices"][0]["message"]["content"] is not None
        while Bank.open(bank).embedded_count < Bank.open(bank).count and time.monotonic() < deadline:
            time.sleep(0.2)
        b = Bank.open(bank)
        assert b.embedded_count == b.count and b.verify()["ok"]
        alive(url)
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 0, log.read_text()
    assert "Traceback" not in log.read_text()
