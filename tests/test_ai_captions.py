"""AI captions (generation against a local chat-completions server), caption-variant loading,
shuffled-caption controls and the Experiment-2 grids."""
from __future__ import annotations

import base64
import io as _io
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest
from PIL import Image

from ai_captions import generate as gen
from local_http import LocalServer
from ai_captions.shuffle import derangement, shuffle_captions, shuffle_elements
from ai_captions.variants import load_caption_variant
from models.clip_tokenizer import build_clip_tokenizer
from pipeline.common_format import SplitData, captions_array, subject_dir, write_split
from pipeline.errors import UserError

SHORT_OK = "a red square on a blue background"
LONG_OK = " ".join(["a red square and a green circle"] * 8)  # 57 BPE tokens + 2 = 59
TOO_LONG = " ".join(["a red square and a green circle"] * 12)


def _images(n=4, size=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


class FakeServer(LocalServer):
    """A local OpenAI-compatible /v1/chat/completions endpoint that records every request.

    ``errors``: HTTP statuses returned (in order) before answering normally; ``reply(req)`` gives the
    assistant text for a decoded request (image index, prompt text, messages)."""

    def __init__(self, images, reply=None):
        self.images = images
        self.keys = {im.tobytes(): i for i, im in enumerate(images)}
        self.requests: list[dict] = []
        self.errors: list[int] = []
        self.reply = reply or (lambda req: SHORT_OK if "25 tokens" in req["prompt"] else LONG_OK)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    status = server.errors.pop(0) if server.errors else 200
                    req = server.decode(body)
                    req["status"] = status
                    server.requests.append(req)
                if status != 200:
                    payload = json.dumps({"error": {"message": f"status {status}", "type": "x"}}).encode()
                else:
                    payload = json.dumps({
                        "id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": server.reply(req)}}],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107}}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        super().__init__(Handler, "/v1")

    def decode(self, body: dict) -> dict:
        first = body["messages"][0]["content"]
        text = next(p["text"] for p in first if p["type"] == "text")
        url = next(p["image_url"]["url"] for p in first if p["type"] == "image_url")
        assert url.startswith("data:image/png;base64,")
        png = base64.b64decode(url.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        image = np.asarray(Image.open(_io.BytesIO(png)).convert("RGB"))
        return {"prompt": text, "image": self.keys.get(image.tobytes(), -1), "messages": body["messages"],
                "model": body["model"], "max_tokens": body.get("max_tokens")}

    def ok_requests(self):
        return [r for r in self.requests if r["status"] == 200]


@pytest.fixture
def server():
    srv = FakeServer(_images())
    yield srv
    srv.close()


@pytest.fixture
def client(server, monkeypatch):
    monkeypatch.setenv("TEST_KEY", "sk-test")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return gen.make_client(server.url, "TEST_KEY", timeout=10)


class Sleeps(list):
    def __call__(self, seconds):
        self.append(seconds)


def _generator(client, **kw):
    kw.setdefault("sleep", Sleeps())
    return gen.Generator(client, **kw)


def _prompts(*names):
    return gen.select_prompts(list(names))


# ---------------------------------------------------------------------------------------------
# generation


def test_prompts_file_has_four_prompts_with_length_rules():
    prompts = gen.load_prompts()
    assert set(prompts) == {"high_short", "high_long", "low_short", "low_long"}
    assert prompts["low_short"].clip_max == 35 and prompts["low_long"].clip_min == 50
    assert prompts["high_long"].clip_max == 77
    assert "25 tokens" in prompts["high_short"].text and "70 tokens" in prompts["low_long"].text
    assert prompts["low_short"].text != prompts["high_short"].text
    with pytest.raises(UserError, match="unknown prompt"):
        gen.select_prompts(["medium_short"])


def test_generate_sends_prompt_and_png_and_writes_outputs(server, client, tmp_path):
    ids = np.array(["im_a", "im_b", "im_c", "im_d"])
    prompts = _prompts("low_short", "high_long")
    written = gen.generate_captions(_generator(client), server.images, ids, prompts, tmp_path, workers=3,
                                    progress=False)
    assert set(written) == {"low_short", "high_long"}
    reqs = server.requests
    assert len(reqs) == 8 and all(r["status"] == 200 for r in reqs)
    # every (image, prompt) exactly once, with the prompt's own text and the exact image
    assert sorted((r["image"], r["prompt"]) for r in reqs) == sorted(
        (i, p.text) for i in range(4) for p in prompts)
    assert {r["model"] for r in reqs} == {"gpt-4o-mini"}
    assert {r["max_tokens"] for r in reqs} == {p.max_tokens for p in prompts}
    caps = np.load(tmp_path / "low_short_captions.npy", allow_pickle=False)
    assert caps.shape == (4, 1) and caps.dtype.kind == "U" and (caps == SHORT_OK).all()
    assert (np.load(tmp_path / "low_short_ids.npy", allow_pickle=False) == ids).all()
    assert (np.load(tmp_path / "high_long_captions.npy", allow_pickle=False) == LONG_OK).all()
    records = gen.CaptionLog(tmp_path / gen.LOG_NAME).read()
    tok = build_clip_tokenizer()
    assert len(records) == 8
    rec = records[("im_b", "high_long")]
    assert rec["status"] == "ok" and rec["requests"] == 1 and rec["usage"]["completion_tokens"] == 7
    assert rec["n_tokens"] == len(tok(LONG_OK).input_ids)  # independent count (BOS + BPE + EOS)
    assert 50 <= rec["n_tokens"] <= 77


def test_retries_429_and_5xx_with_exponential_backoff(server, client, tmp_path):
    server.errors = [429, 500, 503]
    sleeps = Sleeps()
    g = _generator(client, sleep=sleeps, retry=gen.RetryPolicy(max_retries=5, base_delay=1.0, max_delay=60))
    gen.generate_captions(g, server.images[:1], np.array(["x"]), _prompts("low_short"), tmp_path, workers=1,
                          progress=False)
    assert [r["status"] for r in server.requests] == [429, 500, 503, 200]
    assert sleeps == [1.0, 2.0, 4.0]
    assert gen.CaptionLog(tmp_path / gen.LOG_NAME).read()[("x", "low_short")]["status"] == "ok"


def test_connection_errors_are_retried_and_backoff_is_capped():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionError("reset")
        return "done"

    sleeps = Sleeps()
    assert gen.call_with_retry(flaky, gen.RetryPolicy(max_retries=5, base_delay=3, max_delay=5), sleeps) == "done"
    assert sleeps == [3, 5, 5]
    with pytest.raises(ValueError):  # not transient: no retry
        gen.call_with_retry(lambda: (_ for _ in ()).throw(ValueError("bad")), gen.RetryPolicy(), sleeps)
    assert len(sleeps) == 3


def test_exhausted_retries_are_logged_as_errors_and_redone_on_rerun(server, client, tmp_path):
    server.errors = [500, 500, 500]
    g = _generator(client, retry=gen.RetryPolicy(max_retries=2, base_delay=0.5))
    ids = np.array(["x"])
    with pytest.raises(UserError, match="1 of 1 caption requests failed"):
        gen.generate_captions(g, server.images[:1], ids, _prompts("low_short"), tmp_path, workers=1,
                              progress=False)
    rec = gen.CaptionLog(tmp_path / gen.LOG_NAME).read()[("x", "low_short")]
    assert rec["status"] == "error" and "500" in rec["error"]
    assert not (tmp_path / "low_short_captions.npy").exists()  # a failed request is never a '' caption
    written = gen.generate_captions(g, server.images[:1], ids, _prompts("low_short"), tmp_path, workers=1,
                                    progress=False)
    assert [r["status"] for r in server.requests] == [500, 500, 500, 200]
    assert np.load(written["low_short"], allow_pickle=False)[0, 0] == SHORT_OK


def test_bad_request_not_retried_and_auth_failure_stops_the_run(server, client, tmp_path):
    server.errors = [400]
    sleeps = Sleeps()
    with pytest.raises(UserError, match="1 of 1 caption requests failed"):
        gen.generate_captions(_generator(client, sleep=sleeps), server.images[:1], np.array(["x"]),
                              _prompts("low_short"), tmp_path / "a", workers=1, progress=False)
    assert len(server.requests) == 1 and sleeps == []
    server.errors = [401]
    with pytest.raises(UserError, match="401"):
        gen.generate_captions(_generator(client), server.images[:1], np.array(["x"]), _prompts("low_short"),
                              tmp_path / "b", workers=1, progress=False)
    assert not (tmp_path / "b" / gen.LOG_NAME).exists()


class InterruptAfter:
    """An OpenAI-compatible client that delegates k calls, then raises KeyboardInterrupt (Ctrl-C)."""

    def __init__(self, inner, k):
        self.inner, self.k, self.n = inner, k, 0
        self.chat = self
        self.completions = self

    def create(self, **kw):
        self.n += 1
        if self.n > self.k:
            raise KeyboardInterrupt
        return self.inner.chat.completions.create(**kw)


def test_interrupted_run_resumes_without_repeating_requests(server, client, tmp_path):
    ids = np.array(["a", "b", "c", "d"])
    prompts = _prompts("low_short", "high_short")
    with pytest.raises(KeyboardInterrupt):
        gen.generate_captions(_generator(InterruptAfter(client, 3)), server.images, ids, prompts, tmp_path,
                              workers=1, progress=False)
    assert len(server.requests) == 3
    assert len(gen.CaptionLog(tmp_path / gen.LOG_NAME).read()) == 3
    assert not (tmp_path / "low_short_captions.npy").exists()  # incomplete prompt: no output yet
    counts = gen.plan(ids, prompts, gen.CaptionLog(tmp_path / gen.LOG_NAME).read())
    assert sum(c["to_request"] for c in counts.values()) == 5
    gen.generate_captions(_generator(client), server.images, ids, prompts, tmp_path, workers=2, progress=False)
    pairs = [(r["image"], r["prompt"]) for r in server.requests]
    assert len(pairs) == 8 and len(set(pairs)) == 8  # nothing asked twice
    lines = (tmp_path / gen.LOG_NAME).read_text().splitlines()
    keys = [(json.loads(x)["id"], json.loads(x)["prompt"]) for x in lines]
    assert len(keys) == 8 and len(set(keys)) == 8
    # a third run has nothing to do
    gen.generate_captions(_generator(client), server.images, ids, prompts, tmp_path, progress=False)
    assert len(server.requests) == 8


def test_torn_log_line_is_ignored(tmp_path):
    path = tmp_path / gen.LOG_NAME
    good = {"id": "a", "prompt": "low_short", "status": "ok", "caption": "c", "n_tokens": 3}
    path.write_text(json.dumps(good) + "\n" + '{"id": "b", "prompt": "low_sh')
    assert list(gen.CaptionLog(path).read()) == [("a", "low_short")]


def test_wrong_length_is_reasked_then_recorded_invalid(tmp_path, monkeypatch):
    images = _images(2)

    def reply(req):
        if req["image"] == 0:  # too long first, fits after the re-ask
            return TOO_LONG if len(req["messages"]) == 1 else SHORT_OK
        return TOO_LONG  # never fits

    srv = FakeServer(images, reply)
    monkeypatch.setenv("TEST_KEY2", "k")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    try:
        client = gen.make_client(srv.url, "TEST_KEY2", timeout=10)
        ids = np.array(["good", "bad"])
        out = gen.generate_captions(_generator(client, max_reasks=2), images, ids, _prompts("low_short"),
                                    tmp_path, workers=1, progress=False)
        recs = gen.CaptionLog(tmp_path / gen.LOG_NAME).read()
        assert recs[("good", "low_short")]["status"] == "ok" and recs[("good", "low_short")]["requests"] == 2
        bad = recs[("bad", "low_short")]
        assert bad["status"] == "invalid" and bad["requests"] == 3 and bad["n_tokens"] > 35
        reask = [r for r in srv.requests if r["image"] == 0][1]["messages"]
        assert [m["role"] for m in reask] == ["user", "assistant", "user"]
        assert reask[1]["content"] == TOO_LONG and str(len(build_clip_tokenizer()(TOO_LONG).input_ids)) in reask[2]["content"]
        caps = np.load(out["low_short"], allow_pickle=False)
        assert caps[0, 0] == SHORT_OK and caps[1, 0] == ""
        n = len(srv.requests)
        gen.generate_captions(_generator(client, max_reasks=2), images, ids, _prompts("low_short"), tmp_path,
                              progress=False)
        assert len(srv.requests) == n  # invalid is final unless asked
        gen.generate_captions(_generator(client, max_reasks=0), images, ids, _prompts("low_short"), tmp_path,
                              retry_invalid=True, progress=False)
        assert len(srv.requests) == n + 1 and srv.requests[-1]["image"] == 1
    finally:
        srv.close()


def _write_train(tmp_path, images, ids, caps, subject="1", dataset="synthetic"):
    d = subject_dir(tmp_path / "data", dataset, subject)
    write_split(d, "train", subject, SplitData(stim=images, ids=ids, cap=captions_array(caps)))
    return tmp_path / "data"


def test_cli_dry_run_counts_and_full_run(server, client, tmp_path, capsys):
    ids = np.array(["a", "b", "c", "d"])
    data_dir = _write_train(tmp_path, server.images, ids, [["x"]] * 4)
    out = tmp_path / "caps"
    base = ["--data-dir", str(data_dir), "--dataset", "synthetic", "--subject", "1", "--out-dir", str(out),
            "--prompt", "low_short", "--prompt", "high_short", "--no-progress"]
    assert gen.main(base + ["--limit", "1"], client=client) == 0
    capsys.readouterr()
    assert gen.main(base + ["--dry-run"]) == 0  # no key, no client needed
    text = capsys.readouterr().out
    assert "low_short: 4 images, 1 done, 0 invalid length, 0 failed, 3 requests to make" in text
    assert "total: 6 requests" in text
    assert len(server.requests) == 2
    assert gen.main(base, client=client) == 0
    assert len(server.requests) == 8
    assert (np.load(out / "high_short_ids.npy", allow_pickle=False) == ids).all()


def test_missing_api_key_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(UserError, match="NO_SUCH_KEY_VAR"):
        gen.make_client(None, "NO_SUCH_KEY_VAR")
    data_dir = _write_train(tmp_path, _images(2), np.array(["a", "b"]), [["x"]] * 2)
    argv = ["--data-dir", str(data_dir), "--dataset", "synthetic", "--subject", "1", "--api-key-env",
            "NO_SUCH_KEY_VAR", "--out-dir", str(tmp_path / "o")]
    assert gen.main(argv) == 2


# ---------------------------------------------------------------------------------------------
# caption-variant files


def test_load_caption_variant_reorders_by_id_and_reports_missing(tmp_path, caplog):
    from pipeline import io

    io.save_npy(tmp_path / "p_captions.npy", captions_array([["cap c"], [""], ["cap a"]]))
    io.save_npy(tmp_path / "p_ids.npy", np.array([30, 20, 10]))
    with caplog.at_level(logging.WARNING, logger="recon"):
        out = load_caption_variant(tmp_path / "p_captions.npy", np.array(["10", "30", "20"]))
    assert out.tolist() == [["cap a"], ["cap c"], [""]]
    assert "1 of 3 training images have no caption" in caplog.text
    with pytest.raises(UserError, match=r"p_captions\.npy.*'40'"):
        load_caption_variant(tmp_path / "p_captions.npy", np.array([10, 40]))
    with pytest.raises(UserError, match="_captions.npy"):
        load_caption_variant(tmp_path / "p_ids.npy", np.array([10]))
    with pytest.raises(UserError, match="q_captions.npy: file not found"):
        load_caption_variant(tmp_path / "q_captions.npy", np.array([10]))


# ---------------------------------------------------------------------------------------------
# shuffles


def test_shuffle_captions_is_a_seeded_derangement_of_first_captions():
    caps = captions_array([["a1", "a2"], ["", "b2"], ["c1"], [], ["e1", "e2"], ["f1"], ["g1"]])
    out = shuffle_captions(caps, seed=3)
    assert out.shape == (7, 1) and out.dtype.kind == "U"
    first = ["a1", "b2", "c1", "", "e1", "f1", "g1"]
    col = out[:, 0].tolist()
    assert col[3] == ""  # no caption: stays empty
    assert sorted(col) == sorted(first)  # one caption per image, each used once
    assert all(c != f for c, f in zip(col, first) if f)  # nobody keeps its own
    assert (shuffle_captions(caps, 3) == out).all()
    assert any((shuffle_captions(caps, s) != out).any() for s in range(4, 10))
    assert shuffle_captions(captions_array([["only"]]), 0).tolist() == [["only"]]  # n=1: no derangement


def test_derangement_is_uniform_enough():
    rng = np.random.default_rng(0)
    seen = {tuple(derangement(3, rng)) for _ in range(50)}
    assert seen == {(1, 2, 0), (2, 0, 1)}  # the only two derangements of 3


def test_shuffle_elements_permutes_every_value():
    x = np.random.default_rng(0).standard_normal((4, 77, 8)).astype(np.float32)
    y = shuffle_elements(x, seed=1)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.array_equal(np.sort(y, axis=None), np.sort(x, axis=None))
    assert (y != x).mean() > 0.99
    assert not np.allclose(np.sort(y[0], axis=None), np.sort(x[0], axis=None))  # values cross images
    assert np.array_equal(shuffle_elements(x, 1), y) and not np.array_equal(shuffle_elements(x, 2), y)


# ---------------------------------------------------------------------------------------------
# the experiment builders and grids


def _cfg_layout(tmp_path, subject="1"):
    from pipeline.config import load_config
    from pipeline.layout import Layout

    cfg = load_config([], [f"paths.data_dir={tmp_path / 'data'}", f"paths.results_dir={tmp_path / 'res'}",
                           "run.dataset=synthetic"])
    return cfg, Layout(cfg, subject, "v")


def test_experiment_builders_use_these_functions(tmp_path):
    from experiments import builders as ex
    from pipeline import io

    ids = np.array(["a", "b", "c"])
    _write_train(tmp_path, _images(3), ids, [["cap a"], ["cap b"], ["cap c"]])
    cfg, layout = _cfg_layout(tmp_path)
    io.save_npy(tmp_path / "x_captions.npy", captions_array([["ai c"], ["ai a"], ["ai b"]]))
    io.save_npy(tmp_path / "x_ids.npy", np.array(["c", "a", "b"]))
    built = ex.BUILDERS["captions"](layout, cfg, file=str(tmp_path / "x_captions.npy"))
    assert built["captions"].tolist() == [["ai a"], ["ai b"], ["ai c"]]
    shuffled = ex.BUILDERS["shuffled_captions"](layout, cfg, seed=0)["captions"]
    assert sorted(shuffled[:, 0]) == ["cap a", "cap b", "cap c"]
    assert all(s != f"cap {k}" for s, k in zip(shuffled[:, 0], "abc"))


@pytest.mark.parametrize("name", ["ai_captions_deeprecon", "mixing_deeprecon", "captions_demo"])
def test_experiment_files_expand(name):
    from experiments.grid import load_experiment

    exp = load_experiment(name)
    cfg = exp.config()
    methods = {v.method for v in exp.variants}
    for v in exp.variants:  # every override is a valid config key and value
        exp.config(list(v.overrides))
    if name == "ai_captions_deeprecon":
        files = [dict(v.params)["file"] for v in exp.variants if v.method == "captions"]
        assert sorted(f.split("/")[-1] for f in files) == sorted(
            f"{p}_captions.npy" for p in gen.load_prompts())
        assert {"shuffled_captions", "settings"} <= methods
        assert {o for v in exp.variants for o in v.overrides} == {"versatile.text_features=true",
                                                                  "versatile.text_features=shuffled"}
    if name == "mixing_deeprecon":
        mixes = sorted(float(o.split("=")[1]) for v in exp.variants for o in v.overrides)
        assert {0.0, 0.25, 0.4, 0.5, 0.75, 0.99} <= set(mixes)
    if name == "captions_demo":
        assert exp.dataset == "synthetic" and exp.subjects == ["1", "2"] and cfg.run.tiny_models
        overrides = {o for v in exp.variants for o in v.overrides}
        assert overrides == {"versatile.text_features=true", "versatile.text_features=shuffled",
                             "versatile.mix_text=0", "versatile.mix_text=0.99"}


# ---------------------------------------------------------------------------------------------
# failed paid requests never become results (issue 18)


class EchoKeyServer(FakeServer):
    """Answers 400 for the requests whose image index is in ``fail`` and echoes the caller's API key
    (from the Authorization header) in the error text, as some proxies do."""

    def __init__(self, images):
        super().__init__(images)
        self.fail: set[int] = set()
        server = self
        handler = self.httpd.RequestHandlerClass
        ok_post = handler.do_POST

        def do_POST(h):
            length = int(h.headers["Content-Length"])
            raw = h.rfile.read(length)
            req = server.decode(json.loads(raw))
            if req["image"] in server.fail:
                with server.lock:
                    server.requests.append({**req, "status": 400})
                key = h.headers.get("Authorization", "")
                payload = json.dumps({"error": {"message": f"Invalid image for request by {key}.\nSee docs.",
                                                "type": "invalid_request_error"}}).encode()
                h.send_response(400)
                h.send_header("Content-Type", "application/json")
                h.send_header("Content-Length", str(len(payload)))
                h.end_headers()
                h.wfile.write(payload)
                return
            h.rfile = _io.BytesIO(raw)  # let the normal handler answer
            ok_post(h)

        handler.do_POST = do_POST


def test_failed_requests_fail_the_run_are_redacted_and_exactly_retried(tmp_path, monkeypatch):
    images = _images(6)
    srv = EchoKeyServer(images)
    try:
        secret = "sk-secret-KEY-0123456789"
        monkeypatch.setenv("TEST_KEY", secret)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        client = gen.make_client(srv.url, "TEST_KEY", timeout=10)
        ids = np.array([f"im{i}" for i in range(6)])
        prompts = _prompts("low_short")
        srv.fail = set(range(6))  # every request refused with HTTP 400 (not retried)
        with pytest.raises(UserError) as err:
            gen.generate_captions(_generator(client), images, ids, prompts, tmp_path, workers=2, progress=False)
        msg = str(err.value)
        assert "6 of 6 caption requests failed" in msg and "Invalid image" in msg and "\n" not in msg
        assert secret not in msg
        assert len(srv.requests) == 6  # bounded: one request per image, no retries of a 400
        assert not (tmp_path / "low_short_captions.npy").exists()
        log_text = (tmp_path / gen.LOG_NAME).read_text()
        assert secret not in log_text and "[redacted]" in log_text
        assert log_text.count('"status": "error"') == 6

        srv.fail = {1, 4}  # a rerun retries all six failed ones; two fail again
        with pytest.raises(UserError, match="2 of 6 caption requests failed"):
            gen.generate_captions(_generator(client), images, ids, prompts, tmp_path, workers=2, progress=False)
        assert len(srv.requests) == 12
        assert not (tmp_path / "low_short_captions.npy").exists()

        srv.fail = set()  # the third run asks exactly the two that failed, then writes the captions
        written = gen.generate_captions(_generator(client), images, ids, prompts, tmp_path, workers=2,
                                        progress=False)
        assert sorted(r["image"] for r in srv.requests[12:]) == [1, 4]
        caps = np.load(written["low_short"], allow_pickle=False)
        assert caps.shape == (6, 1) and (caps == SHORT_OK).all()
    finally:
        srv.close()


def test_cli_failed_captions_one_line_exit_2(tmp_path, monkeypatch, capsys):
    images = _images(3)
    srv = EchoKeyServer(images)
    try:
        write_split(subject_dir(tmp_path, "synthetic", "1"), "train", "1",
                    SplitData(stim=images, ids=np.array(["a", "b", "c"])))
        monkeypatch.setenv("TEST_KEY", "sk-cli-secret-987654")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        srv.fail = {0, 1, 2}
        rc = gen.main(["--data-dir", str(tmp_path), "--dataset", "synthetic", "--subject", "1", "--prompt",
                       "low_short", "--base-url", srv.url, "--api-key-env", "TEST_KEY", "--no-progress",
                       "--workers", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "3 of 3 caption requests failed" in err[0]
        assert "sk-cli-secret" not in err[0] and len(srv.requests) == 3
    finally:
        srv.close()


def test_ai_caption_variant_with_failed_requests_is_not_built(tmp_path, monkeypatch):
    """The experiment's ai_captions builder against a server answering 400: the builder fails with the
    summary (no variant captions, no '' training captions), and succeeds on a rerun once the server
    answers, asking only for the failed pairs."""
    from experiments import builders as ex

    images = _images(3)
    ids = np.array(["a", "b", "c"])
    _write_train(tmp_path, images, ids, [["cap a"], ["cap b"], ["cap c"]])
    cfg, layout = _cfg_layout(tmp_path)
    srv = EchoKeyServer(images)
    try:
        monkeypatch.setenv("TEST_KEY", "sk-variant-secret-55555")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        srv.fail = {0, 1, 2}
        kw = dict(prompt="low_short", captioner="openai", base_url=srv.url, api_key_env="TEST_KEY", workers=1)
        with pytest.raises(UserError, match="3 of 3 caption requests failed"):
            ex.BUILDERS["ai_captions"](layout, cfg, **kw)
        srv.fail = {2}
        with pytest.raises(UserError, match="1 of 3 caption requests failed"):
            ex.BUILDERS["ai_captions"](layout, cfg, **kw)
        srv.fail = set()
        built = ex.BUILDERS["ai_captions"](layout, cfg, **kw)
        assert built["captions"].tolist() == [[SHORT_OK]] * 3
        assert [r["image"] for r in srv.requests[6:]] == [2] and len(srv.requests) == 7
    finally:
        srv.close()
