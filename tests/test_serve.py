"""sample.py --serve (data/serve.py): the OpenAI API through the official client, sample.py's replies under
load, disconnects, every bad request, and the chat page in a real headless Chromium.

The servers are real `python sample.py --serve` processes on tiny random checkpoints: their replies are noise,
but the same noise sample.py prints for the same prompt and seed, which is what is tested. The queue's
limit is tested in-process, on an Engine whose model waits for the test, so nothing races."""

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers import REPO_ROOT, make_checkpoint, run_script

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from data.serve import Engine, make_app  # noqa: E402
from data.tokenizer import chat_prompt  # noqa: E402

DEFAULTS = dict(max_tokens=256, temperature=0.8, top_p=1.0)  # sample.py's


def start_server(ckpt, *args, timeout=120):
    """`python sample.py --serve` on any free port; returns (process, base url) once it listens."""
    proc = subprocess.Popen([sys.executable, "sample.py", "--serve", f"--ckpt={ckpt}", "--port=0", "--device=cpu",
                             *args], cwd=REPO_ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline, lines = time.time() + timeout, []
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"the server ended (status {proc.returncode}): {''.join(lines)}")
        lines.append(line)
        match = re.search(r"at (http://127\.0\.0\.1:\d+) ", line)
        if match:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its log
            return proc, match[1]
    proc.kill()
    raise TimeoutError(f"no server after {timeout} s: {''.join(lines)}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A chat checkpoint (1,024-token context) and a base one, each served; stopped after the module."""
    root = tmp_path_factory.mktemp("serve")
    make_checkpoint(root / "sft" / "ckpt.pt", chat=True, block_size=1024, seed=1)
    make_checkpoint(root / "base" / "ckpt.pt", chat=False, seed=2)
    procs = {}
    try:
        for name in ("sft", "base"):
            procs[name] = start_server(root / name)
        yield {name: url for name, (_, url) in procs.items()} | {"root": root}
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            proc.wait(timeout=30)


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def sample_py(capsys, ckpt, prompt, *args):
    run_script("sample.py", prompt, f"--ckpt={ckpt}", "--device=cpu", *args)
    return capsys.readouterr().out


def stats(url):
    return httpx.get(f"{url}/stats", timeout=30).json()


# ----------------------------------------------------------------------------- the API, through openai's client
def test_openai_client_chat_streamed_and_not(servers):
    c = client(servers["sft"])
    assert [m.id for m in c.models.list().data] == ["sft"]
    messages = [{"role": "user", "content": "Name three primary colors."}]
    whole = c.chat.completions.create(model="sft", messages=messages, max_tokens=24, seed=11)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == 1 + len(chat_prompt(messages[0]["content"]))  # <|endoftext|> first
    assert whole.usage.completion_tokens <= 24
    chunks = list(c.chat.completions.create(model="sft", messages=messages, max_tokens=24, seed=11, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content and len(chunks) > 3
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    other = c.chat.completions.create(model="sft", messages=messages, max_tokens=24, seed=12)
    assert other.choices[0].message.content != text


def test_openai_client_completions_streamed_and_not(servers):
    c = client(servers["base"])
    whole = c.completions.create(model="base", prompt="Once upon a time", max_tokens=16, seed=5)
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.prompt_tokens == 5
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="base", prompt="Once upon a time",
                                                                          max_tokens=16, seed=5, stream=True))
    assert streamed == whole.choices[0].text


def test_a_seeded_reply_is_what_sample_py_prints(servers, capsys):
    c = client(servers["sft"])
    reply = c.chat.completions.create(model="sft", messages=[{"role": "user", "content": "Hello there"}],
                                      max_tokens=20, seed=7).choices[0].message.content
    assert sample_py(capsys, servers["root"] / "sft", "Hello there", "--seed=7", "--max_new_tokens=20") == reply + "\n"
    text = client(servers["base"]).completions.create(model="base", prompt="The sea", max_tokens=20, seed=3,
                                                      temperature=1.0, top_p=0.9).choices[0].text
    printed = sample_py(capsys, servers["root"] / "base", "The sea", "--seed=3", "--max_new_tokens=20",
                        "--temperature=1.0", "--top_p=0.9")
    assert printed == "The sea" + text + "\n"


def test_stop_strings_end_the_reply_before_them(servers):
    c = client(servers["base"])
    full = c.completions.create(model="base", prompt="A", max_tokens=40, seed=9, temperature=0).choices[0].text
    stop = full[10:13]
    assert len(stop) == 3 and stop.strip()
    for stream in (False, True):
        if stream:
            got = "".join(ch.choices[0].text for ch in c.completions.create(
                model="base", prompt="A", max_tokens=40, seed=9, temperature=0, stop=[stop, "\x00"], stream=True))
        else:
            got = c.completions.create(model="base", prompt="A", max_tokens=40, seed=9, temperature=0,
                                       stop=stop).choices[0].text
        assert got == full[: full.index(stop)]


# ----------------------------------------------------------------------------- under load
def stream_reply(url, seed, max_tokens=32):
    """One streaming chat request over plain HTTP: (the reply, its finish_reason, whether [DONE] came)."""
    body = {"messages": [{"role": "user", "content": f"Tell me about {seed}"}], "max_tokens": max_tokens,
            "seed": seed, "stream": True}
    text, finish, done = "", None, False
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content", "")
                finish = choice["finish_reason"] or finish
    return text, finish, done


def test_sixteen_concurrent_streams_each_get_their_own_reply(servers):
    url = servers["sft"]
    expected = {}
    for seed in range(16):  # one at a time, not streamed
        r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": f"Tell me about {seed}"}], "max_tokens": 32, "seed": seed})
        expected[seed] = (r.json()["choices"][0]["message"]["content"], r.json()["choices"][0]["finish_reason"], True)
    results = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, stream_reply(url, s))) for s in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == expected
    assert len(set(text for text, _, _ in results.values())) == 16


def test_a_client_that_leaves_mid_stream_frees_the_worker(servers):
    url = servers["sft"]
    before = stats(url)
    body = {"messages": [{"role": "user", "content": "Go on"}], "max_tokens": 1024, "seed": 1, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        while '"delta": {"content"' not in next(lines):
            pass  # until the first piece of the reply: the worker is decoding
    deadline = time.time() + 60
    while stats(url)["cancelled"] == before["cancelled"] and time.time() < deadline:
        time.sleep(0.05)
    after = stats(url)
    assert after["cancelled"] == before["cancelled"] + 1 and after["active"] == 0
    assert after["tokens"] - before["tokens"] < 1024  # stopped, not run to the end
    assert stream_reply(url, 3, max_tokens=8)[2]  # and the next client is served


def test_a_long_conversation_drops_whole_old_turns_and_says_so(servers):
    c = client(servers["sft"])
    turn = "word " * 150  # ~150 tokens a message: 4 turns of 2 messages do not fit in 1,024 - 256 tokens
    messages = [m for i in range(4) for m in ({"role": "user", "content": f"{i} {turn}"},
                                               {"role": "assistant", "content": f"{i} {turn}"})]
    messages.append({"role": "user", "content": "and now?"})
    reply = c.chat.completions.create(model="sft", messages=messages, max_tokens=256, seed=1)
    assert reply.model_extra["dropped_turns"] == 2
    assert reply.usage.prompt_tokens <= 1024 - 256
    short = c.chat.completions.create(model="sft", messages=messages[4:], max_tokens=256, seed=1)
    assert short.model_extra["dropped_turns"] == 0 and short.usage.prompt_tokens == reply.usage.prompt_tokens
    assert short.choices[0].message.content == reply.choices[0].message.content


# ----------------------------------------------------------------------------- bad requests
def chat_body(**fields):
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}


BAD = [  # (what is sent, the status, a part of the message)
    ("{not json", 400, "not valid JSON"),
    ("[1, 2]", 400, "must be a JSON object"),
    ("[" * 100_000, 400, "not valid JSON"),
    ('{"max_tokens": 1' + "0" * 5000 + "}", 400, "not valid JSON"),
    (b"\xff\xfe{}", 400, "not valid JSON"),
    ({"max_tokens": 4}, 400, "'messages' must be a non-empty list"),
    ({"messages": []}, 400, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "content must be a string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400, "must alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400, "the user's"),
    ({"messages": [{"role": "user", "content": "word " * 2000}]}, 400, "tokens; with max_tokens the context of 1024"),
    (chat_body(max_tokens=0), 400, "'max_tokens' must be a whole number from 1"),
    (chat_body(max_tokens=10**9), 400, "'max_tokens' must be a whole number from 1"),
    (chat_body(max_tokens="ten"), 400, "'max_tokens' must be"),
    (chat_body(max_tokens=True), 400, "'max_tokens' must be"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400, "'max_completion_tokens'"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "'temperature' must be a number"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', 400, "'temperature'"),
    (chat_body(temperature=-1), 400, "'temperature'"),
    (chat_body(top_p=0), 400, "'top_p'"),
    (chat_body(seed=-3), 400, "'seed'"),
    (chat_body(n=2), 400, "'n' must be 1"),
    (chat_body(stop=[""]), 400, "'stop'"),
    (chat_body(stream="yes"), 400, "'stream'"),
    ("x" * (1 << 20 | 1), 413, "at most 1,048,576"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[f"{i}-{s}" for i, (_, s, _) in enumerate(BAD)])
def test_each_bad_request_is_a_4xx_in_openais_shape(servers, body, status, message):
    url = servers["sft"]
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    r = httpx.post(f"{url}/v1/chat/completions", content=content, timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 200  # and it keeps serving


def test_the_client_sees_the_errors_and_a_base_model_refuses_chat(servers):
    with pytest.raises(openai.BadRequestError, match="not a chat model"):
        client(servers["base"]).chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|the prompt is"):
        client(servers["base"]).completions.create(model="base", prompt="word " * 200, max_tokens=8)
    r = httpx.get(f"{servers['base']}/v1/nowhere", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(f"{servers['base']}/v1/chat/completions", timeout=30)
    assert r.status_code == 405 and "error" in r.json()


def test_serve_settings_are_checked_before_loading(tmp_path):
    from helpers import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("sample.py", "hello", "--serve"), "--serve takes its prompts over HTTP")
    assert_one_line_error(run_cli("sample.py", "--serve", "--port=70000"), "--port=70000: must be from 0 to 65535")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(run_cli("sample.py", "--serve", f"--ckpt={tmp_path}", f"--port={port}", "--device=cpu"),
                              "cannot listen there")  # before the checkpoint (none here) is looked for


# ----------------------------------------------------------------------------- the queue, in-process
@contextlib.contextmanager
def fake_server(replies, max_queue=64):
    """The app in this process around an Engine whose replies() the test writes: (its URL, the Engine)."""
    engine = Engine(replies, lambda seed: None, max_queue=max_queue)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(make_app(engine, "fake", True, 64, DEFAULTS), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    threading.Thread(target=engine.work, daemon=True).start()
    thread.start()
    try:
        wait_until(lambda: server.started)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(30)


def wait_until(condition, timeout=60):
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.02)
    assert condition()


def test_a_full_queue_is_told_429_and_the_rest_are_served():
    gate = threading.Event()

    def replies(ids, max_tokens, temperature, top_p, generator):  # a model that waits for the test
        assert gate.wait(60)
        yield [1, 2], "ab", None
        yield [], "", None

    try:
        with fake_server(replies, max_queue=1) as (url, engine):
            results = []

            def ask():
                results.append(httpx.post(f"{url}/v1/chat/completions", json=chat_body(), timeout=60))

            first = threading.Thread(target=ask)
            first.start()
            wait_until(lambda: engine.stats["active"] == 1)  # the worker holds the first request
            second = threading.Thread(target=ask)
            second.start()
            wait_until(lambda: engine.jobs.qsize() == 1)  # the second waits
            third = httpx.post(f"{url}/v1/chat/completions", json=chat_body(stream=True), timeout=60)
            assert third.status_code == 429 and third.json()["error"]["code"] == "queue_full"
            assert "--max_queue" in third.json()["error"]["message"]
            gate.set()
            first.join(60)
            second.join(60)
            assert [r.status_code for r in results] == [200, 200]
            assert all(r.json()["choices"][0]["message"]["content"] == "ab" for r in results)
            assert httpx.get(f"{url}/stats", timeout=30).json()["completed"] == 2
    finally:
        gate.set()


def test_a_request_the_model_fails_on_is_a_500_and_the_next_is_served():
    calls = []

    def replies(ids, max_tokens, temperature, top_p, generator):  # fails on its first two requests
        calls.append(1)
        yield [1], "a", None
        if len(calls) <= 2:
            raise RuntimeError("out of memory")
        yield [], "", None

    with fake_server(replies) as (url, engine):
        r = httpx.post(f"{url}/v1/chat/completions", json=chat_body(), timeout=60)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        events = httpx.post(f"{url}/v1/chat/completions", json=chat_body(stream=True), timeout=60).text
        assert '"server_error"' in events and "[DONE]" not in events
        r = httpx.post(f"{url}/v1/chat/completions", json=chat_body(), timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "a"
        assert engine.stats["failed"] == 2 and engine.stats["completed"] == 1


def test_serving_without_the_extra_names_the_install(monkeypatch):
    from data import UserError
    from data.serve import listen

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn raises ImportError
    with pytest.raises(UserError, match=r'pip install "\.\[serve\]"'):
        listen("127.0.0.1", 0)


# ----------------------------------------------------------------------------- a real browser
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no chromium + chromedriver (.ci/run installs them)")
def test_the_chat_page_streams_a_reply_in_headless_chromium(servers, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,640"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(60)
        driver.get(servers["sft"] + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "tokens, chat" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "seed").send_keys("7")
        driver.find_element(By.ID, "max_tokens").clear()
        driver.find_element(By.ID, "max_tokens").send_keys("20")
        messages = []
        for n, text in enumerate(["Hello there", "And then?"], start=1):  # the second turn sends the first along
            driver.find_element(By.ID, "input").send_keys(text)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d, n=n: d.find_element(By.ID, "send").is_enabled() and len(
                d.find_elements(By.CSS_SELECTOR, ".assistant")) == n)
            reply = driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1].get_property("textContent")
            messages.append({"role": "user", "content": text})
            expected = client(servers["sft"]).chat.completions.create(
                model="sft", messages=messages, max_tokens=20, seed=7, temperature=0.8).choices[0].message.content
            assert reply == expected and reply  # the page shows what the API gives for the whole conversation
            messages.append({"role": "assistant", "content": reply})
        driver.find_element(By.ID, "reset").click()
        assert not driver.find_elements(By.CSS_SELECTOR, ".assistant")
        assert driver.get_screenshot_as_png()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        driver.quit()


# ----------------------------------------------------------------------------- bench/bench_serve.py
def test_bench_serve_at_toy_size(tmp_path):
    from helpers import run_cli

    result = run_cli("bench/bench_serve.py", "--model=2x64", "--block_size=64", "--clients=1,3", "--requests=2",
                     "--max_tokens=6", f"--out_dir={tmp_path}", timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if re.match(r"\| \d", line)]
    assert [(int(r[0]), int(r[1]), int(r[2])) for r in rows] == [(1, 2, 0), (3, 6, 0)]  # nothing dropped
    assert all(0 < float(r[3]) <= float(r[4]) <= float(r[6]) and float(r[7].replace(",", "")) > 0 for r in rows)
    assert "'completed': 9" in result.stdout  # the warm-up request and 2 + 6
