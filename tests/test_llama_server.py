"""`flashflex serve --engine llama-server`: llama.cpp's own server from the same patched build, one model under its
plan (here: the default chat model streamed under a budget below its size), N slots decoded together. Driven by the
`openai` package on 127.0.0.1; every request bounded in count and time."""

from __future__ import annotations

import concurrent.futures
import signal
import time
import urllib.request

import pytest
from test_serve import Server, _free_port

from conftest import flashflex, one_error

pytestmark = pytest.mark.native

# SmolLM2-135M (~100 MiB of weights) under 80 MiB: most layers stream from disk.
FLAGS = ["--engine", "llama-server", "--budget", "80MiB", "--ctx", "256", "--ubatch", "32", "--threads", "2"]


class LlamaServer(Server):
    """The same harness as the python engine's; the engine comes from the flags or the serve file."""

    ENGINE = None

    def stop_cleanly(self) -> str:
        """SIGTERM; the server must exit 0 within 30 s. Its stderr (killed first if it did not stop)."""
        try:
            code, err = self.stop(signal.SIGTERM, timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        assert code == 0, err[-2000:]
        return err


@pytest.fixture(scope="module")
def slots_server(tools_build):
    srv = LlamaServer(*FLAGS, "--parallel", "3")
    yield srv
    srv.stop()


def test_concurrent_clients_are_served_together_under_the_plan(slots_server):
    client = slots_server.client()
    model = client.models.list().data[0].id

    def ask(i: int):
        return client.completions.create(model=model, prompt=f"Count from {i}:", max_tokens=12, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))  # 6 requests, 3 slots: three at a time, the rest wait
    assert all(a.choices[0].text.strip() and a.usage.completion_tokens >= 1 for a in answers)
    with urllib.request.urlopen(slots_server.base + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert "llamacpp:tokens_predicted_total" in metrics
    with urllib.request.urlopen(slots_server.base + "/slots", timeout=10) as r:
        assert r.status == 200
    stats = slots_server.get("/flashflex/stats")  # the runtime's counters, from inside llama-server
    streamed = stats["models"][stats["default"]]
    assert streamed["mode"] == "dense-stream" and streamed["runtime"]["stream"]["bytes_read"] > 0
    assert streamed["streamed_bytes_read"] == streamed["runtime"]["stream"]["bytes_read"]
    assert streamed["ctx"] == 3 * streamed["ctx_per_slot"] == 3 * 256  # one KV cache shared by the 3 slots
    # where the weights and KV cache are, per buffer type (here: all in host memory), as `run --json` reports them
    assert streamed["devices"] and all(b["host"] for b in streamed["devices"]), streamed["devices"]
    assert sum(b["model"] for b in streamed["devices"]) > 0 and sum(b["context"] for b in streamed["devices"]) > 0


def test_startup_says_what_runs(tools_build):
    """The mode, slots x context and the prompt cache setting, before serving; SIGTERM then stops it cleanly.
    (That the program really reads the spec: test_spec_file's llama-completion tests.)"""
    err = LlamaServer(*FLAGS, "--parallel", "2").stop_cleanly()
    assert "2 slots x 256 tokens" in err and "stream" in err
    assert "prompt cache and context checkpoints off (--cache-ram 0 --ctx-checkpoints 0)" in err


def _decode_calls(srv: LlamaServer) -> float:
    with urllib.request.urlopen(srv.base + "/metrics", timeout=10) as r:
        line = next(x for x in r.read().decode().splitlines() if x.startswith("llamacpp:n_decode_total"))
    return float(line.split()[-1])


def test_a_sliding_window_model_reads_a_prompt_in_its_micro_batches_and_reuses_it_next_turn(tools_build):
    """Gemma 3 (sliding-window attention): upstream's server keeps the window-sized cache and copies its state per
    slot to roll back (context checkpoints, outside the budget), splitting each prompt to make them, each split a pass
    over the streamed weights. Under the plan the cache is full-size (as the plan measured it), so a prompt costs the
    passes its micro-batches need (with checkpoints: 6 calls where 4 are needed) and the next turn of the
    conversation starts from the slot's cached prompt (without checkpoints or the full cache: read again)."""
    from orchestrator.modelfile.locate import default_model_path

    gemma = default_model_path(log=lambda m: None)
    if gemma is None or not gemma.exists():
        pytest.skip("the default model is not installed (make demo installs it)")
    srv = LlamaServer("--engine", "llama-server", "-m", str(gemma), "--budget", "230MiB", "--ctx", "256",
                      "--ubatch", "32", "--threads", "2", "--parallel", "1", "--draft", "none")
    try:
        client = srv.client()
        model = client.models.list().data[0].id
        messages = [{"role": "user", "content": "Put these in alphabetical order: pear, fig, apple, kiwi, plum, lime, "
                                                "date, grape, mango, cherry, lemon, banana, melon."}]
        before = _decode_calls(srv)
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=3, temperature=0)
        calls = _decode_calls(srv) - before
        prompt, generated = answer.usage.prompt_tokens, answer.usage.completion_tokens
        assert prompt > 40 and generated >= 1
        # ceil(prompt / 32) micro-batches, then one pass per generated token after the first
        assert calls == -(-prompt // 32) + generated - 1, (calls, prompt, generated)
        messages += [{"role": "assistant", "content": answer.choices[0].message.content},
                     {"role": "user", "content": "Now in reverse."}]
        again = client.chat.completions.create(model=model, messages=messages, max_tokens=3, temperature=0)
        cached = ((again.model_extra or {}).get("timings") or {}).get("cache_n", 0)
        assert cached >= prompt - 1, (cached, prompt)  # the first turn's prompt, at least, was not read again
    finally:
        srv.stop_cleanly()


def test_sigterm_drains_and_exits(slots_server):
    # (the module fixture stops it too; this checks the status and the time it takes)
    t0 = time.monotonic()
    code, err = slots_server.stop(signal.SIGTERM, timeout=30)
    assert code == 0, err[-2000:]
    assert time.monotonic() - t0 < 30


def test_parallel_that_does_not_fit_is_refused_in_one_line(tools_build):
    result = flashflex("serve", "--engine", "llama-server", "--budget", "80MiB", "--ctx", "8192", "--parallel", "64",
                       "--port", str(_free_port()), timeout=120)
    assert result.returncode != 0
    one_error(result, "--parallel 64")


def test_slots_beyond_the_training_context_are_refused_in_one_line(tools_build):
    """serve's default model (SmolLM2, trained on 8192 tokens) in 4 slots of 4096: the check reads the model served,
    not the default base model (Gemma, trained on 32768, would let it through)."""
    result = flashflex("serve", "--engine", "llama-server", "--ctx", "4096", "--parallel", "4", "--port",
                       str(_free_port()), timeout=120)
    assert result.returncode != 0
    one_error(result, "--parallel 4 x --ctx 4096 = 16384 tokens is beyond", "training context (8192)")


def test_parallel_needs_the_llama_server_engine(tools_build):
    result = flashflex("serve", "--engine", "python", "--parallel", "2", "--port", str(_free_port()), timeout=60)
    one_error(result, "--parallel applies to the llama-server engine", "drop --engine python")


def test_the_default_engine_is_python_only_for_what_llama_server_cannot_serve(tools_build, tmp_path):
    """auto: a draft model or several models choose the python engine, said at startup; --parallel then says
    why."""
    drafting = flashflex("serve", "--draft-model", str(tmp_path / "small.gguf"), "--ubatch", "8", "--parallel", "2",
                         "--port", str(_free_port()), timeout=60)
    assert "engine python: a draft model" in drafting.stderr
    one_error(drafting, "--parallel applies to the llama-server engine", "the python engine serves here")
    two = tmp_path / "two.yaml"
    two.write_text("models:\n  - {alias: a}\n  - {alias: b}\n")
    several = flashflex("serve", str(two), "--queue", "2", "--port", str(_free_port()), timeout=60)
    assert "engine python: 2 models" in several.stderr
    one_error(several, "--queue applies to the llama-server engine")


def test_a_draft_model_is_refused_with_the_llama_server_engine(tools_build, tmp_path):
    result = flashflex("serve", *FLAGS, "--draft-model", str(tmp_path / "small.gguf"), "--port", str(_free_port()),
                       timeout=60)
    assert result.returncode != 0
    one_error(result, "does not serve a draft model", "--engine python")


def test_llama_server_drafts_by_prompt_lookup_in_its_slots_by_default(tools_build):
    """Where weights stream, serve drafts with no flag: flashflex's lookup in llama-server's slots, each slot's
    draft as long as the runtime finds it pays (llama_flashflex_draft_lengths; its figures in /flashflex/stats), at
    most the planned length, its rows in the plan."""
    srv = LlamaServer(*FLAGS, "--parallel", "2", "--draft-max", "3")
    try:
        client = srv.client()
        model = client.models.list().data[0].id
        answer = client.completions.create(model=model, prompt="red green blue, red green blue, red green blue, red",
                                           max_tokens=24, temperature=0)
        timings = (answer.model_extra or {}).get("timings") or {}
        assert answer.usage.completion_tokens >= 1
        assert timings.get("draft_n", 0) > 0, timings  # the repeated text was drafted
        stats = srv.get("/flashflex/stats")
        draft = stats["models"][stats["default"]]["runtime"]["draft"]
        assert draft["adaptive"] is True and draft["drafted"] == timings["draft_n"], (draft, timings)
        (lone,) = draft["by_sequences"]  # one request at a time: passes of one sequence, priced by rows
        assert lone["sequences"] == 1 and {p["rows"] for p in lone["passes_by_rows"]} >= {1, 2}, lone
        assert all(p["rows"] <= 4 for p in lone["passes_by_rows"])  # never more than the planned 3 drafted
    finally:
        err = srv.stop_cleanly()
    assert "drafts by prompt lookup:3 (up to 3 per slot and verification, as many as each pass affords)" in err
    assert "--spec-type ngram-simple" in err and "--spec-ngram-simple-size-m 3" in err


def test_llama_server_lends_the_drafts_rows_to_streamed_weights_and_answers_as_undrafted(tools_build):
    """With no flag the drafts are as long as run's (the default max_tokens: the rows' memory is lent to streamed
    weights between verifications, so the plan does not cap the length), the runtime lends and takes the rows back
    around the passes that verify (llama_flashflex_draft_lengths), and the greedy answers are the undrafted
    server's: a row given back while the server still read it would fail its verifications."""
    prompts = ["red green blue, red green blue, red green blue, red",
               "List: 1. apples 2. pears 3. plums. Again the list: 1."]

    def answers(*flags: str) -> tuple[list[str], int, dict, str]:
        srv = LlamaServer(*FLAGS, "--parallel", "2", *flags)
        try:
            client = srv.client()
            model = client.models.list().data[0].id
            texts, drafted = [], 0
            for prompt in prompts:
                answer = client.completions.create(model=model, prompt=prompt, max_tokens=40, temperature=0)
                texts.append(answer.choices[0].text)
                drafted += ((answer.model_extra or {}).get("timings") or {}).get("draft_n", 0)
            stats = srv.get("/flashflex/stats")
            stream = stats["models"][stats["default"]]["runtime"]["stream"]
        finally:
            err = srv.stop_cleanly()
        return texts, drafted, stream, err

    texts, drafted, stream, err = answers()
    plain, _, plain_stream, _ = answers("--draft", "none")
    assert "drafts by prompt lookup:3 (up to 8 per slot and verification" in err  # DraftConfig.max_tokens
    assert drafted > 0
    assert stream["lent_bytes"] > 0 and stream["lent_tensors"] > 0 and stream["lends"] >= 1, stream
    assert stream["lent_bytes_not_read"] > 0, stream  # lent tensors were kept, not read again at every pass
    assert plain_stream["lent_bytes"] == 0
    assert texts == plain


def test_llama_servers_slots_draft_by_flashflexs_lookup_under_the_plan(tools_build):
    """With one-token drafts and a 3-gram, upstream's ngram-simple never drafts (it drops a draft shorter than its
    n-gram); under the plan it drafts by flashflex's lookup (llama_flashflex_prompt_lookup, `run`'s), which does."""
    srv = LlamaServer(*FLAGS, "--parallel", "2", "--draft-max", "1")
    try:
        client = srv.client()
        model = client.models.list().data[0].id
        answer = client.completions.create(model=model, prompt="red green blue, red green blue, red green blue, red",
                                           max_tokens=24, temperature=0)
        timings = (answer.model_extra or {}).get("timings") or {}
        assert timings.get("draft_n", 0) > 0, timings
    finally:
        err = srv.stop_cleanly()
    assert "--spec-ngram-simple-size-n 3" in err and "--spec-ngram-simple-size-m 1" in err


def test_draft_none_turns_drafting_off(tools_build):
    err = LlamaServer(*FLAGS, "--parallel", "2", "--draft", "none").stop_cleanly()
    assert "drafts by" not in err and "--spec-type" not in err


@pytest.mark.parametrize("gather_ms", [None, 0, 800])
def test_the_window_a_waking_server_waits_for_company_reaches_the_runtime(tools_build, tmp_path, gather_ms):
    """server.gather_ms (a serve file) or, unset, the plan's own window (3% of a pass, gather_window_ms) is the spec's
    gather_ms option, which llama-server's task loop waits when a request wakes it (llama_flashflex_gather): with a
    long window two requests sent 300 ms apart to an idle server start together; with none, or the plan's (about a
    millisecond for this small model), the second starts after the first's pass (300 ms apart: the first request
    would have to reach llama-server 250 ms late for them to start together)."""
    import threading

    flags: list[str] = []
    if gather_ms is not None:
        served = tmp_path / "serve.yaml"
        served.write_text(f"server:\n  gather_ms: {gather_ms}\nmodels:\n  - {{}}\n")
        flags = [str(served)]
    srv = LlamaServer(*flags, *FLAGS, "--parallel", "2", "--draft", "none")
    try:
        client = srv.client()
        model = client.models.list().data[0].id
        answers: list = []

        def ask(i: int) -> None:
            answers.append(client.completions.create(model=model, prompt=f"Count from {i}:", max_tokens=3,
                                                     temperature=0))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        threads[0].start()
        time.sleep(0.3)
        threads[1].start()
        for t in threads:
            t.join(timeout=120)
        assert len(answers) == 2
    finally:
        err = srv.stop_cleanly()
    # llama-server's log stamps: minutes.seconds.milliseconds.microseconds since it started
    times = [line.split(" ")[0] for line in err.splitlines() if "launch_slot_" in line]
    assert len(times) == 2, err[-3000:]
    seconds = [int(m) * 60 + int(s) + int(ms) / 1e3 + int(us) / 1e6
               for m, s, ms, us in (t.split(".") for t in times)]
    together = abs(seconds[1] - seconds[0]) < 0.05
    assert together is (gather_ms == 800), (gather_ms, times)


def test_ctrl_c_in_a_terminal_stops_the_server_cleanly(tools_build):
    """A terminal's Ctrl-C reaches the whole foreground process group: llama-server must get one signal (ours), not
    a second that it takes as "terminate immediately" (skipping its clean shutdown)."""
    import os
    import subprocess
    import sys

    from orchestrator import llama_server

    from conftest import REPO

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "serve", *FLAGS, "--parallel", "1", "--port",
                             str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        llama_server.wait_ready(f"http://127.0.0.1:{port}", proc, timeout=120)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "terminating immediately" not in err and "killing it" not in err
