"""`dimba serve` over HTTP: a live server on loopback (a tiny masked run), driven with httpx. Every bad request is
a 4xx JSON error naming the problem, and the server stays healthy after each."""

import json
import threading
import time

import httpx
import pytest

from dimba.cli import main

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def server(serving, masked_run):
    with serving(masked_run, max_batch=4, max_queue=8, max_steps=1000) as (url, engine):
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, engine


def _healthy(client):
    reply = client.get("/health")
    assert reply.status_code == 200 and reply.json()["status"] == "ok"
    return reply.json()


def _events(lines):
    """The data of each server-sent event (JSON decoded; ``[DONE]`` as is)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_health_and_models_describe_the_family(server):
    client, _ = server
    assert _healthy(client)["queued"] == 0
    card = client.get("/v1/models").json()["data"][0]
    assert card["id"] == "masked" and card["dimba"]["family"] == "masked"
    sampler = card["dimba"]["sampler"]
    assert {"steps", "temperature", "remasking", "block_length"} <= set(sampler)
    assert "eta" not in sampler and "clamp" not in sampler  # continuous settings are not offered for masked
    assert set(sampler["remasking"]["enum"]) >= {"low_confidence", "random"}
    assert card["dimba"]["limits"]["max_steps"] == 1000


def test_one_checkpoint_of_a_run_is_served_under_the_run_and_checkpoint_name(serving, masked_run):
    with serving(masked_run / "checkpoints" / "best.ckpt") as (url, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/v1/models").json()["data"][0]["id"] == "masked-best"
            reply = client.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 4, "seed": 0})
            assert reply.status_code == 200 and reply.json()["choices"][0]["text"]


def test_completion_with_n_seed_and_usage(server):
    client, _ = server
    body = {"prompt": "ROMEO:", "max_tokens": 12, "n": 3, "steps": 6, "seed": 5}
    first = client.post("/v1/completions", json=body)
    assert first.status_code == 200, first.text
    reply = first.json()
    assert reply["object"] == "text_completion" and len(reply["choices"]) == 3
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert all(c["finish_reason"] in ("stop", "length") for c in reply["choices"])
    assert reply["usage"]["prompt_tokens"] >= 1
    assert reply["usage"]["total_tokens"] == reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"]
    again = client.post("/v1/completions", json=body).json()
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in reply["choices"]]  # a seed reproduces


def test_a_seeded_completion_is_what_dimba_generate_prints(server, masked_run, capsys):
    client, _ = server
    reply = client.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 10, "steps": 5, "seed": 3}).json()
    assert main(["generate", str(masked_run), "--prompt", "ROMEO:", "--length", "10", "--steps", "5",
                 "--seed", "3"]) == 0
    assert capsys.readouterr().out == "ROMEO:" + reply["choices"][0]["text"] + "\n"


def test_stop_cuts_the_text_before_the_stop_string(server):
    client, _ = server
    body = {"prompt": "ROMEO:", "max_tokens": 20, "steps": 8, "seed": 1, "temperature": 0}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert text, "the greedy completion is empty"
    stop = text[len(text) // 2]  # one of its characters (blank ones too): the text is cut at its first occurrence
    cut = client.post("/v1/completions", json={**body, "stop": [stop, "\u2603"]}).json()["choices"][0]
    assert cut["text"] == text[: text.index(stop)] and cut["finish_reason"] == "stop"


def test_stream_sends_every_step_then_the_completion(server):
    client, _ = server
    body = {"prompt": "ROMEO:", "max_tokens": 12, "steps": 6, "n": 2, "stream": True, "seed": 2}
    with client.stream("POST", "/v1/completions", json=body) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        events = _events(reply.iter_lines())
    assert events[-1] == "[DONE]"
    steps, final = events[:-2], events[-2]
    assert [e["dimba"]["step"] for e in steps] == list(range(1, len(steps) + 1)) and len(steps) >= 3
    masks = [sum(row["kinds"].count("m") for row in e["dimba"]["canvas"]) for e in steps]
    assert masks[0] > 0 and masks == sorted(masks, reverse=True)  # masks only ever get fewer
    for event in steps:
        assert all(c["text"] == "" for c in event["choices"])  # an OpenAI stream client sees only the final text
        for row in event["dimba"]["canvas"]:
            assert len(row["tokens"]) == len(row["kinds"]) == len(row["confidence"]) == 12
            assert set(row["kinds"]) <= set("mndx")
            assert all(c is None or 0 <= c <= 1 for c in row["confidence"])
    assert len(final["choices"]) == 2 and final["usage"]["completion_tokens"] > 0
    assert "m" not in "".join(row["kinds"] for row in final["dimba"]["canvas"])
    plain = client.post("/v1/completions", json={**body, "stream": False}).json()
    assert [c["text"] for c in plain["choices"]] == [c["text"] for c in final["choices"]]


LONG = "ROMEO: " * 200
BAD = [  # (body, status, words of the message)
    ({"prompt": "ROMEO:", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": ["ROMEO:"]}, 400, "prompt"),
    ({"prompt": "ROMEO:", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "ROMEO:", "stream": "yes"}, 400, "stream"),
    ({"prompt": "ROMEO:", "n": 1.5}, 400, "n"),
    ({"prompt": "ROMEO:", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "ROMEO:", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "ROMEO:", "max_tokens": 10**30}, 400, "max_tokens"),
    ({"prompt": "ROMEO:", "max_tokens": 31}, 400, "context"),
    ({"prompt": "ROMEO:", "n": 0}, 400, "n"),
    ({"prompt": "ROMEO:", "n": 5}, 400, "max-batch"),
    ({"prompt": "ROMEO:", "seed": -1}, 400, "seed"),
    ({"prompt": "ROMEO:", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "ROMEO:", "stop": [""]}, 400, "stop"),
    ({"prompt": "ROMEO:", "frequency_penalty": 1}, 400, "frequency_penalty"),
    ({"prompt": ""}, 400, "empty"),
    ({}, 400, "prompt"),
    ({"prompt": LONG}, 400, "context"),
    ({"prompt": "x" * 100_001}, 400, "characters"),
    ({"prompt": "ROMEO:", "temperature": -1}, 400, "temperature"),
    ({"prompt": "ROMEO:", "top_p": 2}, 400, "top_p"),
    ({"prompt": "ROMEO:", "steps": 0}, 400, "steps"),
    ({"prompt": "ROMEO:", "steps": 1001}, 400, "at most 1000"),
    ({"prompt": "ROMEO:", "remasking": "sometimes"}, 400, "remasking"),
    ({"prompt": "ROMEO:", "eta": 0.5}, 400, "does not apply to the masked family"),
    ({"prompt": "ROMEO:", "block_length": 4, "steps": 2, "max_tokens": 20}, 400, "block"),
    ({"prompt": "ROMEO:", "model": "gpt-4"}, 404, "not served here"),
]


@pytest.mark.parametrize("body, status, words", BAD, ids=[f"{i}-{'_'.join(map(str, b))[:40]}"
                                                          for i, (b, _, _) in enumerate(BAD)])
def test_bad_fields_are_4xx_json_and_the_server_stays_up(server, body, status, words):
    client, _ = server
    reply = client.post("/v1/completions", json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and "\n" not in error["message"]
    _healthy(client)


FIELDS = ["model", "prompt", "max_tokens", "n", "seed", "stop", "stream", "temperature", "top_p", "top_k", "steps",
          "guidance", "eta", "remasking", "block_length", "clamp", "score_temperature", "commit",
          "unmask_threshold", "unmask_entropy", "dual_cache"]


def test_the_request_fields_are_these():
    from dimba.serve.schema import CompletionRequest

    assert sorted(CompletionRequest.model_fields) == sorted(FIELDS)


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("value", [{"a": 1}, [[1]], "seven"])
def test_every_field_refuses_a_wrong_type(server, field, value):
    client, _ = server
    if value == "seven" and field in ("model", "prompt", "stop", "remasking", "clamp", "commit"):
        value = 7  # a string is right for these: a number is wrong
    reply = client.post("/v1/completions", json={"prompt": "ROMEO:", field: value})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and field in error["message"]
    _healthy(client)


RAW = [  # (raw body, status, words)
    (b'{"prompt": "ROMEO:", ', 400, "not valid JSON"),
    (b'{"prompt": "\xff\xfe"}', 400, "not UTF-8"),
    (b'{"prompt": "\\ud800"}', 400, "surrogate"),
    (b'["ROMEO:"]', 400, "JSON object"),
    (b'{"prompt": "ROMEO:", "temperature": NaN}', 400, "temperature"),
    (b"", 400, "not valid JSON"),
    (b"[" * 100_000, 400, "JSON"),
    (b'{"prompt": "' + b"a" * (1 << 20) + b'"}', 413, "larger than"),
]


@pytest.mark.parametrize("raw, status, words", RAW, ids=[f"raw{i}" for i in range(len(RAW))])
def test_malformed_bodies_are_4xx_json(server, raw, status, words):
    client, _ = server
    reply = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text
    assert words in reply.json()["error"]["message"]
    _healthy(client)


def test_unknown_routes_and_methods_are_json(server):
    client, _ = server
    missing = client.get("/v2/nothing")
    assert missing.status_code == 404 and "/v2/nothing" in missing.json()["error"]["message"]
    wrong = client.get("/v1/completions")
    assert wrong.status_code == 405 and "error" in wrong.json()
    _healthy(client)


def test_page_and_its_assets_are_served(server):
    client, _ = server
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text and client.get(asset).status_code == 200


def _wait_for(condition, what, limit=60.0):
    """Poll ``condition()`` until true; fail naming ``what`` after ``limit`` seconds (a hang, not a timing test)."""
    end = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def slow_server(serving, corpus, tiny, tmp_path_factory):
    """A tiny continuous run served: it takes every one of its steps, so 2000 steps last long enough to drop."""
    out = tmp_path_factory.mktemp("runs") / "continuous"
    assert main(["train", "--data", str(corpus), "--max-steps", "2", "--out", str(out), "--quiet", *tiny]) == 0
    with serving(out, max_steps=2000) as (url, engine):
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, engine


def test_a_continuous_model_offers_its_own_controls_and_streams_estimates(slow_server):
    client, _ = slow_server
    sampler = client.get("/v1/models").json()["data"][0]["dimba"]["sampler"]
    assert {"steps", "eta", "clamp", "score_temperature", "commit"} <= set(sampler) and "remasking" not in sampler
    body = {"prompt": "ROMEO:", "max_tokens": 8, "steps": 4, "stream": True, "eta": 1.0, "clamp": "hard"}
    with client.stream("POST", "/v1/completions", json=body) as reply:
        events = _events(reply.iter_lines())
    kinds = "".join(row["kinds"] for e in events[:-2] for row in e["dimba"]["canvas"])
    # no masks on a Gaussian canvas: every position shows its rounded estimate, new where it changed ("n")
    assert len(events) == 4 + 2 and set(kinds) <= set("nex")


def test_a_client_that_drops_mid_stream_frees_its_place(slow_server):
    client, engine = slow_server
    before = engine.counts["abandoned_groups"]
    body = {"prompt": "ROMEO:", "max_tokens": 30, "steps": 2000, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as reply:
        assert next(line for line in reply.iter_lines() if line.startswith("data: "))  # generation has started
    # the connection is closed after one step of 2000: the group is abandoned, nothing is left queued or running
    _wait_for(lambda: engine.counts["abandoned_groups"] == before + 1, "the dropped stream's group to stop")
    _wait_for(lambda: (lambda h: h["queued"] == 0 and h["running"] == 0)(_healthy(client)), "an empty queue")


def test_a_client_that_drops_while_waiting_for_a_completion_frees_its_place(slow_server):
    client, engine = slow_server
    before, completed = engine.counts["abandoned_groups"], engine.counts["completed"]
    body = {"prompt": "ROMEO:", "max_tokens": 30, "steps": 2000}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up on a long generation and closes the connection
        client.post("/v1/completions", json=body, timeout=0.3)
    _wait_for(lambda: engine.counts["abandoned_groups"] == before + 1, "the dropped request's group to stop")
    _wait_for(lambda: (lambda h: h["queued"] == 0 and h["running"] == 0)(_healthy(client)), "an empty queue")
    assert engine.counts["completed"] == completed


def test_full_queue_and_request_time_limit_are_503(serving, masked_run):
    # the worker is stopped, so the first request waits in the queue until its time limit
    with serving(masked_run, start=False, max_queue=1, timeout=1.0) as (url, engine):
        with httpx.Client(base_url=url, timeout=30) as client:
            body = {"prompt": "ROMEO:", "max_tokens": 4, "steps": 2}
            first = {}
            waiting = threading.Thread(target=lambda: first.update(r=client.post("/v1/completions", json=body)))
            waiting.start()
            _wait_for(lambda: _healthy(client)["queued"] == 1, "the first request to be queued")
            full = client.post("/v1/completions", json=body)
            assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
            assert full.headers["retry-after"] == "1"
            waiting.join(30)
            late = first["r"]
            assert late.status_code == 503 and late.json()["error"]["code"] == "timeout"
            assert "time limit" in late.json()["error"]["message"]
            _healthy(client)


@pytest.mark.parametrize("argv, words", [
    (["serve", "/nonexistent/run"], "not found"),
    (["serve", "{run}", "--host", "0.0.0.0"], "--allow-remote"),
    (["serve", "{run}", "--port", "70000"], "--port"),
    (["serve", "{run}", "--max-batch", "0"], "--max-batch"),
    (["serve", "{run}", "--request-timeout", "0"], "--request-timeout"),
    (["serve", "{empty}"], "{empty}"),
])
def test_serve_user_errors_are_one_line_exit_2(argv, words, masked_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = [a.format(run=masked_run, empty=tmp_path / "empty") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dimba: error:") and words.format(empty=tmp_path / "empty") in err and "\n" not in err and "Traceback" not in err
