"""
`python sample.py --serve`: the model behind an OpenAI-compatible HTTP API and a one-page chat UI.

    POST /v1/chat/completions   messages in our chat template (an SFT checkpoint); stream or not
    POST /v1/completions        plain text after <|endoftext|>, as `sample.py "prompt"` continues it
    GET  /v1/models             the one model, with its context length and whether it chats
    GET  /                      data/chat.html: the chat UI (plain JavaScript, nothing loaded from outside)
    GET  /stats                 requests completed, cancelled and queued, tokens generated

One worker thread owns the model and decodes one request at a time, first come first served, with
sample.py's own replies() (the KV cache, and on CUDA the compiled one-token step): each request gets its
own torch.Generator, so a request's reply depends only on itself, and with a seed it is the text sample.py
prints for that prompt and --seed. Up to max_queue requests wait; the next is told 429. A client that goes
away stops its reply at the next chunk of stream_chunk tokens and the worker takes the next request.

Every bad request gets a 4xx JSON error in OpenAI's shape, {"error": {"message", "type", "param", "code"}}.
"""

import asyncio
import json
import queue
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

from data import UserError
from data.tokenizer import EOT, chat_context, chat_prompt, get_tokenizer

MAX_BODY = 1 << 20  # bytes: a request over 1 MiB is refused (413) before it is parsed; a full context is ~10 KB
UI = Path(__file__).resolve().parent / "chat.html"


class ApiError(Exception):
    """A refused request: its HTTP status and OpenAI's error fields."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------- the worker
class Job:
    """One request: its prompt ids and sampling settings in, its reply's chunks out (to the event loop)."""

    def __init__(self, ids, max_tokens, temperature, top_p, seed, loop):
        self.ids, self.max_tokens, self.temperature, self.top_p, self.seed = ids, max_tokens, temperature, top_p, seed
        self.loop, self.out = loop, asyncio.Queue()
        self.cancelled = threading.Event()  # set by the request's side: the client left, or a stop string came
        self.stopped = False  # a stop string ended it: complete, not cancelled

    def put(self, item):
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Engine:
    """The worker: runs replies(ids, max_tokens, temperature, top_p, generator), one job at a time."""

    def __init__(self, replies, new_generator, max_queue):
        self.replies, self.new_generator = replies, new_generator
        self.jobs = queue.Queue(maxsize=max_queue)
        self.stats = dict(completed=0, cancelled=0, failed=0, tokens=0, active=0)

    def submit(self, job):
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(429, f"{self.jobs.maxsize} requests are waiting already; retry shortly, or start the "
                           "server with a larger --max_queue", code="queue_full", kind="rate_limit_error") from None

    def warm_up(self):
        """Decode two tokens: on CUDA with --compile this records the CUDA graph, on the thread that will run
        every request (CUDA graphs belong to the thread that records them)."""
        for _ in self.replies([EOT], 2, 1.0, 1.0, self.new_generator(0)):
            pass

    def work(self):
        """Take the jobs, forever. Run it on the main thread: torch's CPU ops ran 1.6x slower on another
        (2 cores, 6x384: 80 against 127 tokens/s; its OpenMP threads are set up for the main thread)."""
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():  # its client left while it waited
                self.stats["cancelled"] += 1
                continue
            self.stats["active"], outcome, last = 1, "completed", None
            try:
                generator = self.new_generator(job.seed)
                for tokens, text, stop in self.replies(job.ids, job.max_tokens, job.temperature, job.top_p, generator):
                    self.stats["tokens"] += len(tokens)
                    if job.cancelled.is_set():
                        outcome = "completed" if job.stopped else "cancelled"
                        break
                    job.put((tokens, text, stop))
            except Exception as e:  # a bug, not a bad request: the client hears of it, the server goes on
                print(f"[a request failed: {type(e).__name__}: {e}]", file=sys.stderr, flush=True)
                outcome, last = "failed", e
            self.stats["active"] = 0  # first: a client that has its reply sees the worker free
            self.stats[outcome] += 1
            job.put(last)


# ----------------------------------------------------------------------------- requests
def field(body, key, kind, default, check=None, hint=""):
    """body[key] (or default when absent or null) if it has the kind and passes check, else a 400 naming it."""
    value = body.get(key)
    if value is None:
        return default
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind or (check and not check(value)):  # type(): true is no int
        raise ApiError(400, f"'{key}' must be {hint or kind.__name__}, got {json.dumps(value)[:80]}", param=key)
    return value


def sampling(body, defaults, block_size):
    """The request's max_tokens, temperature, top_p, seed and stop strings, checked; sample.py's settings
    where a field is absent, and a fresh random seed where no seed is given."""
    key = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"  # OpenAI's newer name
    max_tokens = field(body, key, int, min(defaults["max_tokens"], block_size), lambda v: 1 <= v <= block_size,
                       f"a whole number from 1 to the context length, {block_size}")
    temperature = field(body, "temperature", float, defaults["temperature"], lambda v: 0 <= v <= 2,
                        "a number from 0 to 2")  # NaN and Infinity fail the range too
    top_p = field(body, "top_p", float, defaults["top_p"], lambda v: 0 < v <= 1, "a number in (0, 1]")
    seed = field(body, "seed", int, None, lambda v: 0 <= v < 2**63, "a whole number from 0 to 2**63 - 1")
    field(body, "n", int, 1, lambda v: v == 1, "1 (one reply per request)")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s
                                                                                   for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    return dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                seed=secrets.randbits(63) if seed is None else seed, stop=stop or [])


def text_of(content, where):
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(
            p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where}.content must be a string or a list of text parts", param=where)


def conversation(body):
    """The (prompt, reply) turns before the last user message, and that message. A system (or developer)
    message has no token of its own in our template: its text starts the first user message."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    system, said = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"{where} must be an object with a 'role' and a 'content'", param=where)
        role, text = m["role"], text_of(m.get("content"), where)
        if role in ("system", "developer"):
            system.append(text)
        elif role in ("user", "assistant"):
            expected = "user" if not said or said[-1][0] == "assistant" else "assistant"
            if role != expected:
                raise ApiError(400, f"{where}: a {role} message after a {said[-1][0] if said else 'start'}; the "
                               "user and assistant messages must alternate, starting with the user", param=where)
            said.append((role, text))
        else:
            raise ApiError(400, f"{where}: unknown role {role!r}; this model knows system, user and assistant",
                           param=where)
    if not said or said[-1][0] != "user":
        raise ApiError(400, "the last message must be the user's: the model replies to it", param="messages")
    texts = [t for _, t in said]
    if system:
        texts[0] = "\n\n".join(system + [texts[0]])
    return list(zip(texts[0:-1:2], texts[1:-1:2], strict=True)), texts[-1]


# ----------------------------------------------------------------------------- the app
def make_app(engine, name, chat, block_size, defaults):
    """The FastAPI app around an Engine, for a model called name with a context of block_size tokens."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title=f"{name} (sample.py --serve)", docs_url=None, redoc_url=None)
    enc = get_tokenizer()

    @app.exception_handler(ApiError)
    async def refused(request, e):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # an unknown path (404) or method (405), in OpenAI's shape
        return JSONResponse(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                            status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e):  # no route parses a model, so this is FastAPI's own 422, answered as a 400
        return JSONResponse(ApiError(400, str(e)).body(), status_code=400)

    async def read_json(request):
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > MAX_BODY:
            raise ApiError(413, f"the request body is {int(size):,} bytes; at most {MAX_BODY:,}",
                           code="request_too_large")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > MAX_BODY:
                raise ApiError(413, f"the request body is over {MAX_BODY:,} bytes", code="request_too_large")
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, an int of 5,000 digits, [[[[...
            raise ApiError(400, f"the body is not valid JSON ({e}); send a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def room(max_tokens):
        return block_size - min(max_tokens, block_size // 2)  # as sample.py: the reply gets up to half the context

    def too_long(n, limit, param):
        return ApiError(400, f"the prompt is {n} tokens; with max_tokens the context of {block_size} holds at most "
                        f"{limit} prompt tokens: shorten it or lower max_tokens", param=param,
                        code="context_length_exceeded")

    async def pieces(job, request, stops, poll):
        """The reply as (text, tokens) pieces, then a final (None, finish_reason). Text that could begin a stop
        string is held back until it cannot; a stop string or the client leaving cancels the job. poll: ask
        whether the client is still there (a stream learns it from the failed send instead)."""
        held, n = "", 0
        longest = max(map(len, stops), default=0)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(job.out.get(), timeout=1.0)
                except asyncio.TimeoutError:  # still queued
                    item = ()
                if poll and await request.is_disconnected():
                    return
                if item == ():
                    continue
                if isinstance(item, Exception):
                    raise ApiError(500, f"the server failed on this request ({type(item).__name__}); see its log",
                                   kind="server_error")
                if item is None:
                    yield held, 0
                    yield None, "length" if n >= job.max_tokens else "stop"
                    return
                tokens, text, stop = item
                n += len(tokens)
                held += text
                cut = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    job.stopped = True
                    yield held[:cut], len(tokens)
                    yield None, "stop"
                    return
                if stop is not None:
                    continue  # the worker ends the job next: the held text comes with its None
                keep = max(0, longest - 1)
                emit, held = (held[: len(held) - keep], held[len(held) - keep :]) if keep else (held, "")
                yield emit, len(tokens)
        finally:
            job.cancelled.set()  # a no-op for a finished job; otherwise the worker drops it at its next chunk

    async def respond(request, body, ids, params, kind, extra):
        """The completion of ids as one JSON response or as server-sent events; kind is "chat" or "text"."""
        stream = field(body, "stream", bool, False, hint="true or false")
        opts = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        job = Job(ids, params["max_tokens"], params["temperature"], params["top_p"], params["seed"],
                  asyncio.get_running_loop())
        engine.submit(job)  # before any reply is sent: a full queue is a 429, not an event in a stream
        head = dict(id=f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}",
                    object="chat.completion" if kind == "chat" else "text_completion", created=int(time.time()),
                    model=name)

        def usage(n):
            return dict(prompt_tokens=len(ids), completion_tokens=n, total_tokens=len(ids) + n)

        if not stream:
            text, n, finish = [], 0, None
            async for piece, tokens in pieces(job, request, params["stop"], poll=True):
                if piece is None:
                    finish = tokens
                else:
                    text.append(piece)
                    n += tokens
            if finish is None:  # the client left
                return JSONResponse({}, status_code=499)
            text = "".join(text)
            choice = (dict(index=0, message=dict(role="assistant", content=text), logprobs=None, finish_reason=finish)
                      if kind == "chat" else dict(index=0, text=text, logprobs=None, finish_reason=finish))
            return JSONResponse({**head, "choices": [choice], "usage": usage(n), **extra})

        head["object"] = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def event(delta=None, finish=None, **more):
            choice = (dict(index=0, delta=delta or {}, logprobs=None, finish_reason=finish) if kind == "chat"
                      else dict(index=0, text=(delta or {}).get("content", ""), logprobs=None, finish_reason=finish))
            return f"data: {json.dumps({**head, 'choices': [choice], **more})}\n\n"

        async def events():
            yield event({"role": "assistant", "content": ""}, **extra)
            n = 0
            try:
                async for piece, tokens in pieces(job, request, params["stop"], poll=False):
                    if piece is None:
                        yield event(finish=tokens)
                        if opts.get("include_usage"):
                            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(n)})}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    n += tokens
                    if piece:
                        yield event({"content": piece})
            except ApiError as e:
                yield f"data: {json.dumps(e.body())}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        if not chat:
            raise ApiError(400, f"{name} is not a chat model (its checkpoint was not instruction-tuned): use "
                           "/v1/completions, or serve an SFT checkpoint (finetune_sft.py)", param="messages",
                           code="not_a_chat_model")
        turns, text = conversation(body)
        params = sampling(body, defaults, block_size)
        limit = room(params["max_tokens"])
        alone = len(chat_prompt(text)) + 1  # <|endoftext|><|user|>{text}<|assistant|>
        if alone > limit:
            raise too_long(alone, limit, "messages")
        ids, dropped = chat_context(turns, text, limit)  # as sample.py --interactive: whole old turns go
        return await respond(request, body, ids, params, "chat", dict(dropped_turns=dropped))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        prompt = body.get("prompt", "")
        prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string (or a list of one string)", param="prompt")
        params = sampling(body, defaults, block_size)
        ids = [EOT, *enc.encode_ordinary(prompt)]
        if len(ids) > room(params["max_tokens"]):
            raise too_long(len(ids), room(params["max_tokens"]), "prompt")
        return await respond(request, body, ids, params, "text", {})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [dict(id=name, object="model", created=0, owned_by="local", chat=chat,
                                                context_length=block_size)]}

    @app.get("/stats")
    async def stats():
        return {**engine.stats, "queued": engine.jobs.qsize()}

    @app.get("/", response_class=HTMLResponse)
    async def ui():
        return UI.read_text(encoding="utf-8")

    return app


def listen(host, port):
    """The listening socket (port 0: any free port), taken before the model loads, with FastAPI and uvicorn
    imported: a taken port or a missing extra is a one-line error at once, not after the load."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("--serve needs FastAPI and uvicorn: pip install \".[serve]\" (or pip install fastapi "
                        "uvicorn)") from None
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # from now on a client waits in the backlog until uvicorn accepts it
    except OSError as e:
        raise UserError(f"--host={host} --port={port}: cannot listen there ({e.strerror}); pick another --port "
                        "(0 = any free one)") from None
    return sock


def serve_http(sock, replies, new_generator, name, chat, block_size, defaults, max_queue):
    """Serve replies() on the socket from listen() until Ctrl-C."""
    import uvicorn

    engine = Engine(replies, new_generator, max_queue)
    app = make_app(engine, name, chat, block_size, defaults)
    engine.warm_up()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    http = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True, name="http")
    http.start()  # the HTTP side on a thread, the model on this one
    host, port = sock.getsockname()[:2]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    print(f"[serving {name} at {url} : the chat UI at /, the OpenAI API at {url}/v1]", file=sys.stderr, flush=True)
    try:
        engine.work()
    except KeyboardInterrupt:
        server.should_exit = True
        http.join(timeout=5)
        print("[the server stopped]", file=sys.stderr, flush=True)
