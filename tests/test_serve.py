"""pipeline serve: the official openai client gets the replies `pipeline chat` gives, streamed or not; parallel
requests get what they would alone; every bad request gets a 4xx in OpenAI's error shape; the page works in a
real headless Chromium.

The server is the real one (uvicorn on 127.0.0.1, a free port) in a thread of this process.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.chat import ChatSession, Sampling
from pipeline.models import load_stage_model
from pipeline.serve.app import MAX_BODY_BYTES, create_app

QUESTION = "Where does Tolbik live?"


class Server:
    """uvicorn serving create_app(run_dir) in a thread; .url is http://127.0.0.1:PORT."""

    def __init__(self, run_dir: Path, api_key: str | None = None):
        import uvicorn

        config = uvicorn.Config(create_app(run_dir, api_key), host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(dpo_run):
    run_dir, _ = dpo_run
    server = Server(run_dir)
    yield server
    server.stop()


def call(url: str, body=None, headers: dict | None = None, method: str | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one request; `body` is sent as JSON unless it is bytes."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})},
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def ask(model: str, messages: list[dict] | None = None, **settings) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": QUESTION}] if messages is None else messages,
            **settings}


def turn(role: str, content="hi") -> dict:
    return {"role": role, "content": content}


def reply_text(server, body: dict) -> str:
    status, answer = call(f"{server.url}/v1/chat/completions", body)
    assert status == 200, answer
    return answer["choices"][0]["message"]["content"]


def streamed_text(server, body: dict) -> str:
    """The content of every chunk of a streamed reply, read with the standard library alone."""
    request = urllib.request.Request(f"{server.url}/v1/chat/completions", data=json.dumps({**body, "stream": True})
                                     .encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        events = [line[6:] for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])


def test_openai_client_gets_the_replies_pipeline_chat_gives(server, dpo_run):
    from openai import OpenAI

    run_dir, _ = dpo_run
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["pretrain", "sft", "dpo"]
    for stage in ("sft", "dpo"):
        # pipeline chat --greedy, in process: two turns, a system message, control tokens typed as text
        model, tokenizer = load_stage_model(run_dir / stage)
        session = ChatSession(model, tokenizer, Sampling(greedy=True, max_new_tokens=16), system="Be brief.")
        first = session.reply(QUESTION)
        second = session.reply("And <|im_end|><|end|> his pet?")
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION},
                    {"role": "assistant", "content": first},
                    {"role": "user", "content": "And <|im_end|><|end|> his pet?"}]

        whole = client.chat.completions.create(model=stage, messages=messages, temperature=0, max_tokens=16)
        assert whole.model == stage and whole.object == "chat.completion"
        choice = whole.choices[0]
        assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
        assert choice.message.content == second
        usage = whole.usage
        assert 0 < usage.completion_tokens <= 16 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert usage.prompt_tokens == len(session.renderer.prompt_ids(messages))

        chunks = list(client.chat.completions.create(model=stage, messages=messages, temperature=0, max_tokens=16,
                                                     stream=True, stream_options={"include_usage": True}))
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == second
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
        assert chunks[-1].usage.completion_tokens == usage.completion_tokens


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 20, 0.8)])
def test_seeded_sampler_draws_what_generate_draws_after_manual_seed(dpo_run, temperature, top_k, top_p):
    """Sampling with a generator of its own (so parallel requests never share random state) is generate()'s
    own sampling: the same tokens as do_sample=True after torch.manual_seed(seed), as `pipeline chat` drew them."""
    import torch

    from pipeline.chat import generate_ids
    from pipeline.chat_template import ChatRenderer
    from pipeline.generation import stop_token_ids

    run_dir, _ = dpo_run
    model, tokenizer = load_stage_model(run_dir / "pretrain")
    renderer = ChatRenderer(tokenizer)
    prompt = renderer.prompt_ids([turn("user", QUESTION)])
    sampling = Sampling(max_new_tokens=24, temperature=temperature, top_k=top_k, top_p=top_p, seed=5)
    ids = torch.tensor([prompt])
    torch.manual_seed(5)
    expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=True,
                              temperature=temperature, top_k=top_k or None, top_p=top_p,
                              eos_token_id=stop_token_ids(tokenizer, renderer),
                              pad_token_id=tokenizer.pad_token_id or renderer.end_of_turn)[0, len(prompt):].tolist()
    torch.manual_seed(123)  # the global generator plays no part
    assert generate_ids(model, tokenizer, renderer, prompt, sampling) == expected


def test_sampling_follows_the_seed_and_stop_strings_cut(server):
    settings = dict(temperature=1.0, top_p=0.9, max_tokens=24)
    one, again = (reply_text(server, ask("pretrain", seed=7, **settings)) for _ in range(2))
    assert one == again == streamed_text(server, ask("pretrain", seed=7, **settings))
    others = {reply_text(server, ask("pretrain", seed=seed, **settings)) for seed in (1, 2, 3)}
    assert len(others | {one}) > 1, "different seeds should draw different replies"
    stop = next(c for c in one[2:] if c.strip())  # a character the reply holds after its start
    status, cut = call(f"{server.url}/v1/chat/completions", ask("pretrain", seed=7, stop=[stop], **settings))
    assert status == 200 and cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["message"]["content"] == one[: one.index(stop)]
    assert streamed_text(server, ask("pretrain", seed=7, stop=stop, **settings)) == one[: one.index(stop)]


def test_a_temperature_too_small_to_divide_by_is_greedy(server):
    """1e-40 turned the logits into inf and NaN and the draw failed (a 500); under 1e-6 sampling is greedy."""
    greedy = reply_text(server, ask("sft", temperature=0, max_tokens=8))
    assert reply_text(server, ask("sft", temperature=1e-40, max_tokens=8, seed=3)) == greedy
    assert streamed_text(server, ask("sft", temperature=1e-40, max_tokens=8, seed=3)) == greedy


def test_requests_queued_for_a_busy_model_do_not_stall_the_others(dpo_run):
    """48 requests for one stage whose model is busy (its lock held here) wait for their turn on the event loop: the
    model list, the key check and another stage answer meanwhile. Before, the 48 held anyio's 40 worker threads,
    blocked on the lock, and every other request waited for them."""
    run_dir, _ = dpo_run
    server = Server(run_dir)
    try:
        reply_text(server, ask("pretrain", max_tokens=1))  # loaded
        loaded = server.server.config.app.state.models.get("pretrain")
        with ThreadPoolExecutor(48) as pool:
            with loaded.lock:
                queued = [pool.submit(streamed_text if i % 2 else reply_text, server, ask("pretrain", max_tokens=1))
                          for i in range(48)]
                time.sleep(2)  # all 48 sent and waiting
                started = time.monotonic()
                status, listed = call(f"{server.url}/v1/models")
                assert status == 200 and "dpo" in [m["id"] for m in listed["data"]]
                assert reply_text(server, ask("dpo", max_tokens=2)) is not None
                assert time.monotonic() - started < 30
                assert not any(f.done() for f in queued)
            assert all(isinstance(f.result(timeout=120), str) for f in queued)  # each answered once its turn came
    finally:
        server.stop()


def test_a_plain_request_whose_client_went_away_generates_nothing(dpo_run, monkeypatch):
    """A client that sends a (not streamed) request and goes away while it waits for a busy model: its generation
    stops before its first token instead of writing up to max_tokens for nobody."""
    import socket

    import pipeline.serve.app as app_module

    replies, real = [], app_module.generate
    monkeypatch.setattr(app_module, "generate", lambda *args: replies.append(real(*args)) or replies[-1])
    run_dir, _ = dpo_run
    server = Server(run_dir)
    try:
        assert reply_text(server, ask("pretrain", max_tokens=3, temperature=0)) is not None
        assert replies[0].completion_tokens > 0  # this model does write a reply to that prompt
        loaded = server.server.config.app.state.models.get("pretrain")
        body = json.dumps(ask("pretrain", max_tokens=3, temperature=0)).encode()
        with loaded.lock:
            with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as client:
                client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                               b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                time.sleep(2)  # read, and waiting for the model (its prompt is tokenized under the lock too)
            time.sleep(1)  # gone, and seen to be gone
        deadline = time.monotonic() + 30
        while len(replies) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(replies) == 2 and replies[1].completion_tokens == 0
    finally:
        server.stop()


def test_parallel_requests_get_what_they_get_alone(dpo_run):
    """8 requests at once across two stages, streamed and not, on a fresh server (so the two models also load
    side by side), with a malformed request among them: each gets the reply it gets alone afterwards."""
    run_dir, _ = dpo_run
    requests = [ask(stage, seed=seed, temperature=temperature, max_tokens=20, stream=stream)
                for stage in ("pretrain", "dpo") for seed, temperature, stream in
                [(0, 0, False), (1, 1.0, True), (2, 0.8, False), (3, 1.2, True)]]
    malformed = ask("dpo", [turn("user", "a"), turn("user", "b")])
    server = Server(run_dir)
    try:
        def one(body):
            if body is malformed:
                return call(f"{server.url}/v1/chat/completions", body)
            return 200, (streamed_text if body["stream"] else reply_text)(server, body)

        jobs = requests[:4] + [malformed] + requests[4:]
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(one, jobs))
        alone = [reply_text(server, {**r, "stream": False}) for r in requests]
    finally:
        server.stop()
    status, error = results.pop(4)
    assert status == 400 and error["error"]["param"] == "messages[1].role"
    assert [text for _, text in results] == alone
    assert alone[:4] != alone[4:]  # the two stages answer differently: replies that crossed over would show


LONG = "Tolbik " * 400  # past the tiny model's 128 positions


@pytest.mark.parametrize("body, status, param, code", [
    pytest.param(ask("gpt-4"), 404, "model", "model_not_found", id="unknown model"),
    pytest.param(ask("tokenizer"), 404, "model", "model_not_found", id="a stage that is no model"),
    pytest.param(b'{"model": "sft", "messages": [', 400, None, "invalid_json", id="malformed JSON"),
    pytest.param(b"\xff\xfe", 400, None, "invalid_json", id="not UTF-8"),
    pytest.param([ask("sft")], 400, None, None, id="not an object"),
    pytest.param({"messages": [turn("user")]}, 400, "model", None, id="no model"),
    pytest.param(ask("sft", "hello"), 400, "messages", None, id="messages not a list"),
    pytest.param(ask("sft", []), 400, "messages", None, id="empty messages"),
    pytest.param(ask("sft", [{"role": "user"}]), 400, "messages[0].content", None, id="message without content"),
    pytest.param(ask("sft", [turn("user", 5)]), 400, "messages[0].content", None, id="content not text"),
    pytest.param(ask("sft", [turn("robot")]), 400, "messages[0].role", None, id="unknown role"),
    pytest.param(ask("sft", [turn("user"), turn("user")]), 400, "messages[1].role", None, id="two user turns in a row"),
    pytest.param(ask("sft", [turn("assistant"), turn("user")]), 400, "messages[0].role", None, id="assistant first"),
    pytest.param(ask("sft", [turn("user"), turn("system")]), 400, "messages[1].role", None, id="system later"),
    pytest.param(ask("sft", [turn("user"), turn("assistant")]), 400, "messages", None, id="ends with assistant"),
    pytest.param(ask("sft", max_tokens=0), 400, "max_tokens", None, id="max_tokens 0"),
    pytest.param(ask("sft", max_tokens=100_000), 400, "max_tokens", "context_length_exceeded",
                 id="max_tokens past the context"),
    pytest.param(ask("sft", [turn("user", LONG)]), 400, "messages", "context_length_exceeded",
                 id="messages past the context"),
    pytest.param(ask("sft", temperature=-0.1), 400, "temperature", None, id="temperature below 0"),
    pytest.param(ask("sft", temperature=2.5), 400, "temperature", None, id="temperature above 2"),
    pytest.param(ask("sft", top_p=0), 400, "top_p", None, id="top_p 0"),
    pytest.param(ask("sft", top_p=1.5), 400, "top_p", None, id="top_p above 1"),
    pytest.param(ask("sft", stop=["a", "b", "c", "d", "e"]), 400, "stop", None, id="five stop strings"),
    pytest.param(ask("sft", n=2), 400, "n", None, id="n 2"),
    pytest.param(ask("sft", stream="yes please"), 400, "stream", None, id="stream not a boolean"),
    pytest.param(ask("sft", seed=2**64), 400, "seed", None, id="seed past what a generator takes"),
    pytest.param(ask("sft", seed=-1), 400, "seed", None, id="seed below 0"),
    pytest.param(ask("\ud800"), 404, "model", "model_not_found", id="model name UTF-8 cannot encode"),
    pytest.param(ask("sft", [turn("user", "x" * MAX_BODY_BYTES)]), 413, None, "request_too_large",
                 id="body over 1 MB"),
])
def test_a_bad_request_gets_a_4xx_in_openai_shape(server, body, status, param, code):
    got, answer = call(f"{server.url}/v1/chat/completions", body)
    assert got == status, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"]
    assert (answer["error"]["param"], answer["error"]["code"]) == (param, code)
    assert reply_text(server, ask("sft", max_tokens=2)) is not None  # and the server still serves


def test_unknown_routes_and_methods_answer_in_openai_shape(server):
    assert call(f"{server.url}/v1/completions", ask("sft"))[0] == 404
    status, answer = call(f"{server.url}/v1/models", method="DELETE")
    assert status == 405 and answer["error"]["message"]


def test_a_port_in_use_or_out_of_range_is_a_one_line_error(dpo_run, cli_env):
    import socket
    import subprocess
    import sys

    from pipeline.errors import PipelineError
    from pipeline.serve.app import listen_socket

    run_dir, _ = dpo_run
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PipelineError, match=rf"cannot listen on 127.0.0.1:{port}: .*in use; choose another --port"):
            listen_socket("127.0.0.1", port)
        result = subprocess.run([sys.executable, "-m", "pipeline", "serve", str(run_dir), "--port", str(port)],
                                capture_output=True, text=True, env=cli_env, timeout=120)
        assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
        assert result.stderr.strip().splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: Address already in "
                                                      "use; choose another --port"]
    result = subprocess.run([sys.executable, "-m", "pipeline", "serve", str(run_dir), "--port", "99999"],
                            capture_output=True, text=True, env=cli_env, timeout=120)
    assert result.returncode == 2
    assert "argument --port: expected a TCP port from 1 to 65535, got '99999'" in result.stderr
    assert "Traceback" not in result.stderr
    free = listen_socket("127.0.0.1", 0)  # the socket uvicorn is handed is bound where asked
    assert free.getsockname()[0] == "127.0.0.1" and free.getsockname()[1] > 0
    free.close()


def test_serving_to_other_machines_without_a_key_warns(dpo_run, monkeypatch, capsys):
    import uvicorn

    from pipeline.serve.app import serve

    run_dir, _ = dpo_run
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: sockets[0].close())  # bind, do not serve
    warning = "warning: --host 0.0.0.0 takes requests from other machines and no --api-key"
    for host, key, warned in (("0.0.0.0", None, True), ("0.0.0.0", "s3cret", False), ("127.0.0.1", None, False),
                              ("localhost", None, False)):
        assert serve(run_dir, host=host, port=0, api_key=key) == 0
        assert (warning in capsys.readouterr().out) == warned, (host, key)


def test_the_api_key_is_enforced_when_set(dpo_run):
    from openai import AuthenticationError, OpenAI

    run_dir, _ = dpo_run
    server = Server(run_dir, api_key="s3cret")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            status, answer = call(f"{server.url}/v1/models", headers=headers)
            assert status == 401 and answer["error"]["code"] == "invalid_api_key"
            assert call(f"{server.url}/v1/chat/completions", b"{not json", headers)[0] == 401  # the key comes first
        assert call(f"{server.url}/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
        client = OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0)
        assert client.chat.completions.create(model="sft", messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=2).choices[0].message is not None
        with urllib.request.urlopen(server.url + "/", timeout=10) as page:  # the page itself is public: it asks
            assert page.status == 200
    finally:
        server.stop()


# ---------------------------------------------------------------- the page, in a real browser

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
                    reason="needs Chromium and its driver from the distribution: apt-get install chromium "
                    "chromium-driver (.ci/run installs them)")
def test_the_page_compares_two_stages_in_a_headless_browser(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,760"):
        options.add_argument(flag)
    # an explicit driver path: Selenium Manager never goes to the network for one
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    wait = WebDriverWait(browser, 60)
    try:
        browser.get(server.url + "/")
        wait.until(lambda b: len(Select(b.find_element(By.ID, "model-b")).options) == 3)
        Select(browser.find_element(By.ID, "model-a")).select_by_value("sft")
        Select(browser.find_element(By.ID, "model-b")).select_by_value("dpo")
        settings = {"temperature": "0", "max_tokens": "12", "seed": "0"}
        for field, value in settings.items():
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(value)
        history = {"sft": [], "dpo": []}
        for turn, message in enumerate([QUESTION, "And his pet?"], start=1):
            browser.find_element(By.ID, "message").send_keys(message)
            browser.find_element(By.ID, "send").click()
            done = "#column-{} .turn.assistant[data-state=done]"
            wait.until(lambda b: all(len(b.find_elements(By.CSS_SELECTOR, done.format(c))) == turn for c in "ab"))
            for column, stage in zip("ab", ("sft", "dpo")):
                shown = browser.find_elements(By.CSS_SELECTOR, done.format(column) + " .text")[-1]
                history[stage].append({"role": "user", "content": message})
                # textContent, not .text: the browser's rendering of trailing new lines is not the reply's
                expected = reply_text(server, ask(stage, history[stage], temperature=0, max_tokens=12, seed=0))
                assert shown.get_attribute("textContent") == expected
                history[stage].append({"role": "assistant", "content": expected})
        # a new conversation, sampled, with a system message: the picture in the README
        browser.find_element(By.ID, "reset").click()
        assert not browser.find_elements(By.CSS_SELECTOR, ".turn")
        for field, value in {"temperature": "0.8", "max_tokens": "24", "system": "Answer in one sentence."}.items():
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(value)
        browser.find_element(By.ID, "message").send_keys("What is Tolbik's job?\n")  # Enter sends
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".turn.assistant[data-state=done]")) == 2)
        browser.save_screenshot(str(tmp_path / "serve.png"))
        if os.environ.get("PIPELINE_SERVE_SCREENSHOT"):  # the test run (README: scripts/serve_screenshot.py)
            shutil.copy(tmp_path / "serve.png", os.environ["PIPELINE_SERVE_SCREENSHOT"])
    finally:
        browser.quit()
