"""`m3lite serve`: an OpenAI-compatible local HTTP server on the standard library's `http.server`.

Endpoints: GET /v1/models, GET /health; POST /v1/completions, /v1/chat/completions (server-sent events with
"stream": true), /v1/embeddings (the sentence embedder banks search with), /v1/banks/search. Responses carry an `m3lite`
field: the mode, the references used (with the share of attention each memory received), timings and notes.
Requests may carry `"m3lite": {"mode": "memory"|"rag"|"none"}` (the openai client's `extra_body`); searches
take "retriever": "hybrid"|"lexical"|"dense".

Requests are answered one at a time, in order of arrival (a ticket queue): a 2-core CPU runs one generation
at full speed rather than several slowly. Malformed requests get a 4xx with an OpenAI-style error object
{"error": {"message", "type", "param", "code"}}; the server keeps serving.
"""
from __future__ import annotations

import base64
import json
import signal
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


from . import __version__
from .chat import Chat, ContextLengthError, Turn, reference_summary
from .params import DEFAULTS
from .errors import BadArgument, M3Error
from .memory import MODES, bank_embedder, search_bank
from .retrieval import RETRIEVERS

MAX_BODY = 1 << 20  # bytes; larger requests get 413
MAX_DRAIN = 64 << 20  # a larger body is not even read before the 413 (the connection is closed on it)
MAX_WAITING = 64  # requests queued behind the running one; more get 503
MAX_INPUTS = 2048  # texts per embeddings request


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TicketQueue:
    """One request at a time, first come first served; at most `limit` waiting. `during()`: a context manager
    held while a request is served (the background work of m3lite.background waits then)."""

    def __init__(self, limit: int = MAX_WAITING, during=None):
        self.limit = limit
        self.during = during
        self._held = None
        self._cv = threading.Condition()
        self._next = 0  # the ticket the next arrival gets
        self._serving = 0  # the ticket being served

    @property
    def waiting(self) -> int:
        with self._cv:
            return max(0, self._next - self._serving - 1)

    def __enter__(self):
        with self._cv:
            if self._next - self._serving > self.limit:
                raise APIError(503, f"the server has {self.limit} requests waiting; retry later", "server_error",
                               code="server_busy")
            ticket = self._next
            self._next += 1
            while self._serving != ticket:
                self._cv.wait()
        if self.during is not None:
            self._held = self.during()
            self._held.__enter__()
        return self

    def __exit__(self, *exc):
        held, self._held = self._held, None
        if held is not None:
            held.__exit__(None, None, None)
        with self._cv:
            self._serving += 1
            self._cv.notify_all()


# ------------------------------------------------------------------------------------------------ request fields

def _field(body: dict, name: str, kind: str, default=None, low=None, high=None):
    """body[name] checked against `kind` ("string", "integer", "number", "boolean", "object", "array");
    missing or null: default. A value of the wrong type or out of [low, high] is a 400 naming the field."""
    v = body.get(name)
    if v is None:
        return default
    ok = {"string": isinstance(v, str), "boolean": isinstance(v, bool), "object": isinstance(v, dict),
          "array": isinstance(v, list),
          "integer": isinstance(v, int) and not isinstance(v, bool),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool)}[kind]
    if not ok:
        raise APIError(400, f"'{name}' must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}", param=name,
                       code="invalid_type")
    if (low is not None and v < low) or (high is not None and v > high):
        rng = f"at least {low}" if high is None else f"between {low} and {high}"
        raise APIError(400, f"'{name}' must be {rng}, got {v}", param=name, code="invalid_value")
    return v


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        return stop
    raise APIError(400, "'stop' must be a string or a list of at most 4 strings", param="stop", code="invalid_type")


def _token_ids(v, vocab_size: int, param: str) -> list[int] | None:
    """v as a non-empty list of token ids (400 if one is out of range); None if v is not such a list."""
    if not (isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)):
        return None
    if min(v) < 0 or max(v) >= vocab_size:
        raise APIError(400, f"token ids in '{param}' must lie in [0, {vocab_size})", param=param,
                       code="invalid_value")
    return v


def _text(content, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                raise APIError(400, f"{where}: only text content parts are supported", param="messages",
                               code="invalid_value")
        return "\n".join(out)
    raise APIError(400, f"{where}: 'content' must be a string or a list of text parts", param="messages",
                   code="invalid_type")


def conversation(messages) -> tuple[str, list[Turn], str]:
    """OpenAI messages -> (system text, earlier turns, the question): user messages are questions,
    assistant messages their answers; the last message must be the user's."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of messages", param="messages",
                       code="invalid_type")
    system: list[str] = []
    turns: list[Turn] = []
    question: list[str] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a 'role'", param="messages",
                           code="invalid_type")
        role, text = m["role"], _text(m.get("content"), f"messages[{i}]")
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            question.append(text)
        elif role == "assistant":
            if question:
                turns.append(Turn(question=" ".join(question), answer=text.strip()))
                question = []
            elif turns:
                turns[-1].answer = (turns[-1].answer + " " + text.strip()).strip()
            else:
                system.append(text)
        else:
            raise APIError(400, f"messages[{i}]: role {role!r} is not supported (system, user, assistant)",
                           param="messages", code="invalid_value")
    if not question or not " ".join(question).strip():
        raise APIError(400, "the last message must be the user's, with some text", param="messages",
                       code="invalid_value")
    return "\n".join(s.strip() for s in system if s.strip()), turns, " ".join(question)


# ------------------------------------------------------------------------------------------------ the server

class App:
    """What the handlers share: the model, the bank, a Chat (its own KV cache) and the request queue."""

    def __init__(self, model, bank=None, mode: str | None = None, model_id: str | None = None,
                 retriever: str = "hybrid"):
        self.model = model
        self.chat = Chat(model, bank=bank, mode=mode, retriever=retriever)
        self.bank = self.chat.bank
        self.retriever = retriever
        self._embed = None
        self.mode = self.chat.mode
        self.model_id = model_id or Path(model.files.path).name
        self.created = int(time.time())
        self.filler = None  # the bank's missing sentence vectors, computed between requests (`serve` starts it)
        if self.bank is not None:
            from .background import VectorFiller

            if VectorFiller.missing(self.bank):
                self.filler = VectorFiller(self.bank.path, bank_embedder(self.bank))
        self.queue = TicketQueue(during=self.filler.busy if self.filler is not None else None)

    def model_card(self) -> dict:
        b = self.bank
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "m3lite",
                "m3lite": {"fingerprint": self.model.fingerprint, "context": self.model.config.max_seq_len,
                           "bank": str(b.path) if b is not None else None,
                           "references": b.live_count if b is not None else 0, "mode": self.mode}}

    def _mode(self, body: dict) -> str:
        ext = _field(body, "m3lite", "object", {})
        mode = ext.get("mode", self.mode)
        if mode not in MODES:
            raise APIError(400, f"'m3lite.mode' must be one of {', '.join(MODES)}", param="m3lite.mode",
                           code="invalid_value")
        if mode != "none" and self.bank is None:
            raise APIError(400, f"mode {mode!r} needs a bank: start the server with --bank BANK", param="m3lite.mode",
                           code="no_bank")
        return mode

    def _sampling(self, body: dict) -> dict:
        if _field(body, "n", "integer", 1, 1, 1) != 1:
            raise APIError(400, "'n' must be 1", param="n")
        ext = _field(body, "m3lite", "object", {})
        return {"temperature": _field(body, "temperature", "number", DEFAULTS.temperature, 0, 2),
                "top_p": _field(body, "top_p", "number", DEFAULTS.top_p, 0, 1) or 1e-6,
                "top_k": _field(body, "top_k", "integer", _field(ext, "top_k", "integer", DEFAULTS.top_k, 0), 0),
                "repetition_penalty": _field(ext, "repetition_penalty", "number", DEFAULTS.repetition_penalty, 0.01,
                                             10),
                "seed": _field(body, "seed", "integer"), "stop": _stop(body)}

    def _max_tokens(self, body: dict, default: int | None) -> int | None:
        ctx = self.model.config.max_seq_len
        n = _field(body, "max_completion_tokens", "integer", None, 1)
        n = _field(body, "max_tokens", "integer", n, 1)
        if n is not None and n >= ctx:
            raise APIError(400, f"'max_tokens' is {n} but the model's context holds {ctx} tokens, prompt "
                                f"included", param="max_tokens", code="context_length_exceeded")
        return default if n is None else n

    @staticmethod
    def _extension(r) -> dict:
        return {"mode": r.mode, "references": [reference_summary(x) for x in r.references], "notes": r.notes,
                "timings": r.timings()}

    @staticmethod
    def _usage(r) -> dict:
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": len(r.tokens),
                "total_tokens": r.prompt_tokens + len(r.tokens)}

    # ---- endpoints (called with the queue held) ------------------------------------------------------------

    def chat_completion(self, body: dict):
        """-> (the answer's pieces, a function giving its GenerationResult once they are consumed); a bad
        request raises APIError here, before anything is sent."""
        system, turns, question = conversation(body.get("messages"))
        mode, sampling = self._mode(body), self._sampling(body)
        max_tokens = self._max_tokens(body, None)
        chat = self.chat
        chat.reset(history=turns, system=system)
        chat.set_mode(mode)
        try:
            pieces = chat.send(question, stream=True, reserve=max_tokens,
                               max_new_tokens=max_tokens or self.model.config.max_seq_len, **sampling)
        except ContextLengthError as e:
            raise APIError(400, str(e), param="max_tokens" if max_tokens else "messages",
                           code="context_length_exceeded") from None
        return pieces, lambda: chat.last_result

    def completion(self, body: dict):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        ids = self.model.encode_prompt(prompt) if isinstance(prompt, str) else \
            _token_ids(prompt, self.model.tokenizer.vocab_size, "prompt")
        if ids is None:
            raise APIError(400, "'prompt' must be a string, a list of one string, or a list of token ids",
                           param="prompt", code="invalid_type")
        mode, sampling = self._mode(body), self._sampling(body)
        max_tokens = self._max_tokens(body, 16)
        ctx = self.model.config.max_seq_len
        if len(ids) + max_tokens > ctx:
            raise APIError(400, f"the prompt has {len(ids)} tokens and 'max_tokens' asks for {max_tokens} more, "
                                f"but the context holds {ctx}", param="max_tokens", code="context_length_exceeded")
        m = self.model
        pieces = m.generate(ids, max_new_tokens=max_tokens, stream=True, bank=self.bank if mode != "none" else None,
                            mode=mode, retriever=self.chat._search or self.retriever, **sampling)
        return pieces, lambda: m.last_result

    @property
    def embed(self):
        """The sentence embedder: the bank's, or without a bank the default one (loaded on first use)."""
        if self._embed is None:
            from .embedder import default_embedder

            self._embed = bank_embedder(self.bank) if self.bank is not None else default_embedder()
        return self._embed

    def embeddings(self, body: dict) -> dict:
        x = body.get("input")
        tok = self.model.tokenizer
        V = tok.vocab_size
        if isinstance(x, str):
            texts = [x]
        elif isinstance(x, list) and x and all(isinstance(s, str) for s in x):
            texts = list(x)
        elif isinstance(x, list) and x and all(_token_ids(s, V, "input") is not None for s in x):
            texts = [tok.decode(s, skip_special=True) for s in x]
        elif _token_ids(x, V, "input") is not None:
            texts = [tok.decode(x, skip_special=True)]
        else:
            raise APIError(400, "'input' must be a string, a list of strings, or token ids (a list of them)",
                           param="input", code="invalid_type")
        if len(texts) > MAX_INPUTS:
            raise APIError(400, f"'input' holds {len(texts)} items; at most {MAX_INPUTS}", param="input")
        fmt = _field(body, "encoding_format", "string", "float")
        if fmt not in ("float", "base64"):
            raise APIError(400, "'encoding_format' must be float or base64", param="encoding_format",
                           code="invalid_value")
        dims = _field(body, "dimensions", "integer")
        if dims is not None and dims != self.embed.dim:
            raise APIError(400, f"this embedder has {self.embed.dim} dimensions", param="dimensions",
                           code="invalid_value")
        vecs = self.embed(texts).astype("<f4")
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.tobytes()).decode() if fmt == "base64" else v.tolist()}
                for i, v in enumerate(vecs)]
        n = sum(len(tok.encode(t)) for t in texts)
        return {"object": "list", "data": data, "model": self.model_id,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    def search(self, body: dict) -> dict:
        if self.bank is None:
            raise APIError(400, "no bank: start the server with --bank BANK", param="query", code="no_bank")
        query = _field(body, "query", "string")
        if not query or not query.strip():
            raise APIError(400, "'query' must be a non-empty string", param="query", code="invalid_value")
        k = _field(body, "k", "integer", 5, 1, 100)
        retriever = _field(body, "retriever", "string", self.retriever)
        if retriever not in RETRIEVERS:
            raise APIError(400, f"'retriever' must be one of {', '.join(RETRIEVERS)}", param="retriever",
                           code="invalid_value")
        found = search_bank(self.model, self.bank, query, k,
                            self.chat._search if retriever == self.retriever else retriever)
        return {"object": "list", "data": [reference_summary(r) for r in found],
                "model": self.model_id}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"m3lite/{__version__}"
    timeout = 120  # seconds an idle keep-alive connection is kept
    app: App  # set on the subclass made by make_server

    def log_message(self, format, *args):
        sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    # ---- plumbing -------------------------------------------------------------------------------------------

    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: APIError) -> None:
        self._send_json(e.status, e.body())

    def _body(self) -> dict:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise APIError(411, "send the body with a Content-Length (chunked bodies are not supported)",
                           code="length_required")
        try:
            n = int(self.headers.get("Content-Length", ""))
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise APIError(411, "a POST needs a valid Content-Length header", code="length_required") from None
        if n > MAX_BODY:
            if n <= MAX_DRAIN:  # read and drop it, so that the client, still sending, gets the answer
                while n > 0:
                    n -= len(self.rfile.read(min(n, 1 << 16)) or b"\0" * n)
            self.close_connection = True
            raise APIError(413, f"the request body has {int(self.headers['Content-Length'])} bytes; the limit is "
                                f"{MAX_BODY}", code="request_too_large")
        raw = self.rfile.read(n)
        self._read = True
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        _field(body, "model", "string")
        return body

    def _route(self, method: str):
        path = self.path.split("?", 1)[0].rstrip("/")
        routes = {("GET", "/v1/models"): self._models, ("GET", "/health"): self._health,
                  ("GET", ""): self._health,
                  ("POST", "/v1/chat/completions"): self._chat, ("POST", "/v1/completions"): self._completions,
                  ("POST", "/v1/embeddings"): self._embeddings, ("POST", "/v1/banks/search"): self._search}
        if (method, path) in routes:
            return routes[(method, path)], None
        if method == "GET" and path.startswith("/v1/models/"):
            return self._model, path[len("/v1/models/"):]
        if any(p == path for _, p in routes):
            raise APIError(405, f"{method} is not allowed on {path}", code="method_not_allowed")
        raise APIError(404, f"no such endpoint: {method} {self.path}", code="not_found")

    def _handle(self, method: str) -> None:
        self._read = False
        try:
            fn, arg = self._route(method)
            fn(arg) if arg is not None else fn()
        except APIError as e:
            if not self._read and self.headers.get("Content-Length", "0") not in ("", "0"):
                self.close_connection = True  # an unread body would be taken for the next request
            self._error(e)
        except M3Error as e:
            self._error(APIError(400, str(e)))
        except OSError:  # the connection broke or timed out: nothing more can be said on it
            self.close_connection = True
        except Exception as e:  # a bug: answer it, log it, keep serving
            traceback.print_exc(file=sys.stderr)
            self._error(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    # ---- endpoints ----------------------------------------------------------------------------------------

    def _health(self):
        self._send_json(200, {"status": "ok", "waiting": self.app.queue.waiting, "model": self.app.model_id})

    def _models(self):
        self._send_json(200, {"object": "list", "data": [self.app.model_card()]})

    def _model(self, name: str):
        if name != self.app.model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server has {self.app.model_id!r}",
                           param="model", code="model_not_found")
        self._send_json(200, self.app.model_card())

    def _embeddings(self):
        body = self._body()
        with self.app.queue:
            out = self.app.embeddings(body)
        self._send_json(200, out)

    def _search(self):
        body = self._body()
        with self.app.queue:
            out = self.app.search(body)
        self._send_json(200, out)

    def _chat(self):
        self._generate(self._body(), chat=True)

    def _completions(self):
        self._generate(self._body(), chat=False)

    def _generate(self, body: dict, chat: bool) -> None:
        stream = _field(body, "stream", "boolean", False)
        usage_in_stream = _field(_field(body, "stream_options", "object", {}), "include_usage", "boolean", False)
        app = self.app
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        with app.queue:
            pieces, result = app.chat_completion(body) if chat else app.completion(body)

            def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
                if not chat:
                    c = {"index": 0, "text": text or "", "logprobs": None}
                elif not stream:
                    c = {"index": 0, "message": {"role": "assistant", "content": text}}
                else:
                    delta = {"role": "assistant"} if first else {}
                    c = {"index": 0, "delta": delta if text is None else {**delta, "content": text}}
                c["finish_reason"] = finish
                return c

            def envelope(choices: list, **extra) -> dict:
                return {"id": rid, "object": kind + (".chunk" if stream and chat else ""), "created": created,
                        "model": app.model_id, "choices": choices, **extra}

            if not stream:
                try:
                    text = "".join(pieces)
                finally:
                    pieces.close()
                r = result()
                self._send_json(200, envelope([choice(text.lstrip() if chat else text, _finish(r))],
                                              usage=App._usage(r), m3lite=app._extension(r)))
                return
            self.close_connection = True  # the event stream ends when the connection does
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                if chat:
                    self._event(envelope([choice("", None, first=True)]))
                started = not chat  # a chat answer's leading whitespace is dropped, as without streaming
                for piece in pieces:
                    if not started:
                        piece = piece.lstrip()
                        if not piece:
                            continue
                        started = True
                    self._event(envelope([choice(piece, None)]))
                r = result()
                self._event(envelope([choice(None, _finish(r))], m3lite=app._extension(r)))
                if usage_in_stream:
                    self._event(envelope([], usage=App._usage(r)))
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except OSError:
                pass  # the client went away (or stopped reading): closing `pieces` stops the generation
            except Exception as e:  # after the headers: the error goes into the stream
                err = e if isinstance(e, APIError) else APIError(
                    400 if isinstance(e, M3Error) else 500, str(e) or type(e).__name__,
                    "invalid_request_error" if isinstance(e, M3Error) else "server_error")
                if not isinstance(e, M3Error):
                    traceback.print_exc(file=sys.stderr)
                self._event(err.body())
            finally:
                pieces.close()

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()


def _finish(r) -> str:
    return "length" if r.finish_reason == "length" else "stop"


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a connection left open never keeps the process alive
    request_queue_size = MAX_WAITING  # connections the OS holds before we accept them


def make_server(model, bank=None, host: str = "127.0.0.1", port: int = 8000,
                mode: str | None = None, retriever: str = "hybrid") -> ThreadingHTTPServer:
    """A ready (bound, not yet serving) server; `port` 0 picks a free one (see `server.server_address`).
    `mode`: the requests' default (memory with a bank, else none); `retriever`: the searches' default."""
    app = App(model, bank=bank, mode=mode, retriever=retriever)
    handler = type("M3Handler", (Handler,), {"app": app})
    try:
        srv = _Server((host, port), handler)
    except OSError as e:
        raise BadArgument(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port") from None
    srv.app = app
    return srv


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(model, bank=None, host: str = "127.0.0.1", port: int = 8000, mode: str | None = None,
          log=print, retriever: str = "hybrid") -> None:
    """Serve until Ctrl-C."""
    srv = make_server(model, bank=bank, host=host, port=port, mode=mode, retriever=retriever)
    h, p = srv.server_address[:2]
    app = srv.app
    where = f"bank {app.bank.path} ({app.bank.live_count:,} references), mode {app.mode}" if app.bank is not None \
        else "no bank (plain model)"
    log(f"m3lite serve: http://{h}:{p}/v1 (model {app.model_id}, {where}); Ctrl-C stops")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as cleanly as Ctrl-C
    if app.filler is not None:
        log(f"m3lite serve: {app.filler.missing(app.bank):,} references have no sentence vector yet; they are "
            f"computed between requests, and dense search covers each once it has one")
        app.filler.start()
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        log("m3lite serve: stopped")
    finally:
        if app.filler is not None:
            app.filler.stop(timeout=2.0)
        srv.server_close()
