"""Speculative decoding (qwen2_pure/speculative.py): prompt lookup and draft models on the generation engine.

Greedy output must be token for token that of plain greedy decoding, whatever the guesses: a draft equal to
the target (every guess accepted), a noisy copy (some accepted), an unrelated model (almost none), drafts with
fewer and more vocabulary rows than the target, stop ids and length limits inside an accepted run. Sampling
must follow the target's distribution: checked on the accept/resample rule itself (20,000 draws over 8 ids),
and on a model's logits through the row's penalty and warpers. The prompt-lookup guesses are compared with transformers'
PromptLookupCandidateGenerator. The command line (--prompt-lookup, --draft-model) and the server (a
speculator through create_app) are driven once each.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qwen2_pure as q
from qwen2_pure.engine import Engine, Sequence
from qwen2_pure.errors import Qwen2PureError
from qwen2_pure.sampling import SamplingParams
from qwen2_pure.speculative import DraftModel, PromptLookup, accept_or_resample, make_speculator, prompt_lookup
from hf_utils import make_hf_checkpoint

V = 257  # hf_utils' vocabulary: ids 0..254 are text, 255 bos/pad, 256 eos


# ---- models -------------------------------------------------------------------------------------------------

def _tiny(path, **kw):
    """A tiny random checkpoint through the production loader, its embeddings made loud and the final norm's
    signs flipped at random, so that greedy text varies (random models otherwise repeat one id)."""
    make_hf_checkpoint(path, **{"heads": 4, "kv_heads": 2, "head_dim": 16, "layers": 2, **kw})
    model = q.load_model(path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)
        norm = model.model.norm.weight
        norm.mul_(torch.where(torch.rand(norm.shape, generator=g) < 0.5, -1.0, 1.0))
    return model


def _copy(model, vocab: int, noise: float, seed: int):
    """`model` with `vocab` rows (cut, or padded with random rows) and Gaussian noise on every weight."""
    cfg = dataclasses.replace(model.config, vocab_size=vocab)
    out = q.Qwen2ForCausalLM(cfg, model.generation_config)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, w in model.state_dict().items():
        if w.shape[0] == model.config.vocab_size:
            extra = torch.randn((max(0, vocab - w.shape[0]),) + w.shape[1:], generator=g) * w.std()
            w = torch.cat([w[:vocab], extra])
        state[name] = w + noise * w.std() * torch.randn(w.shape, generator=g)
    out.load_state_dict(state)
    return out.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster than two, and much faster on a machine other tests keep busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("spec_target"), seed=0)


@pytest.fixture(scope="module")
def drafts(target, tmp_path_factory):
    return {
        "same": target,
        "noisy": _copy(target, V, 0.3, seed=1),
        "unrelated": _tiny(tmp_path_factory.mktemp("spec_draft"), seed=1, layers=1),
        "fewer rows": _copy(target, V - 9, 0.3, seed=2),  # 248 rows: target ids 248.. cannot be guessed
        "more rows": _copy(target, V + 7, 0.3, seed=3),
    }


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Random prompts that repeat a stretch of themselves, as code to be rewritten does."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        body = torch.randint(0, 248, (int(torch.randint(4, 20, (), generator=g)),), generator=g).tolist()
        out.append(body + body[: len(body) // 2])
    return out


def _run(model, prompt, speculator, **kw):
    """Tokens and stats of one sequence through the engine."""
    engine = Engine(model, max_batch=1, max_seq_len=len(prompt) + kw.get("max_new_tokens", 16),
                    speculator=speculator)
    seq = Sequence(prompt=prompt, **kw)
    with torch.inference_mode():
        engine.add([seq])
        while engine.rows:
            engine.step()
    return seq, engine.stats


def test_fixture_text_varies(target):
    """Guard: greedy text of the fixture is varied, so 'identical' means something."""
    for prompt in _prompts(4):
        [out] = q.generate(target, [prompt], max_new_tokens=40, stop_token_ids=[])
        assert len(set(out)) >= 8, out


# ---- prompt lookup: transformers' candidates -----------------------------------------------------------------

def test_prompt_lookup_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator
    g = torch.Generator().manual_seed(0)
    checked = 0
    for trial in range(300):
        n = int(torch.randint(2, 40, (), generator=g))
        seq = torch.randint(0, 6, (n,), generator=g).tolist()  # 6 ids: many n-gram matches
        k, ngram = int(torch.randint(1, 8, (), generator=g)), int(torch.randint(1, 4, (), generator=g))
        eos = [int(torch.randint(0, 8, (), generator=g))]
        ref = PromptLookupCandidateGenerator(eos_token_id=torch.tensor(eos), num_output_tokens=k,
                                             max_matching_ngram_size=ngram, max_length=10_000)
        cand, _ = ref.get_candidates(torch.tensor([seq]))
        expected = cand[0, n:].tolist()
        assert prompt_lookup(seq, k, ngram, frozenset(eos)) == expected, (seq, k, ngram, eos)
        checked += bool(expected)
    assert checked > 100  # most trials found a match


# ---- greedy: the tokens of plain decoding --------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain(target):
    """Plain greedy tokens (40, no stop id) of each test prompt, by prompt."""
    return {tuple(p): q.generate(target, [p], max_new_tokens=40, stop_token_ids=[])[0]
            for seed in range(4) for p in _prompts(3, seed=seed)}


@pytest.mark.parametrize("n", [1, 3, 10])
def test_greedy_prompt_lookup_is_plain_greedy(target, plain, n):
    accepted = 0
    for i, prompt in enumerate(_prompts(3)):
        if i == 0:  # the public API once, the engine (and its counters) otherwise
            assert q.generate(target, [prompt], max_new_tokens=40, stop_token_ids=[],
                              prompt_lookup_num_tokens=n)[0] == plain[tuple(prompt)]
        seq, stats = _run(target, prompt, PromptLookup(n), max_new_tokens=40, stop_token_ids=[])
        assert seq.tokens == plain[tuple(prompt)]
        assert stats.get("spec_accepted", 0) <= stats.get("spec_proposed", 0)
        accepted += stats.get("spec_accepted", 0)
    assert accepted > 0  # the repeated text was guessed right at times


@pytest.mark.parametrize("name", ["same", "noisy", "unrelated", "fewer rows", "more rows"])
@pytest.mark.parametrize("n", [1, 4])
def test_greedy_draft_model_is_plain_greedy(target, drafts, plain, name, n):
    draft = drafts[name]
    proposed = accepted = 0
    for i, prompt in enumerate(_prompts(3, seed=1)):
        if i == 0:
            assert q.generate(target, [prompt], max_new_tokens=40, stop_token_ids=[], assistant_model=draft,
                              num_assistant_tokens=n)[0] == plain[tuple(prompt)]
        seq, stats = _run(target, prompt, DraftModel(draft, n), max_new_tokens=40, stop_token_ids=[])
        assert seq.tokens == plain[tuple(prompt)], name
        proposed, accepted = proposed + stats["spec_proposed"], accepted + stats["spec_accepted"]
    rate = accepted / proposed
    if name == "same":
        assert rate == 1.0
    elif name == "unrelated":
        assert rate < 0.3
    else:
        assert 0.0 < rate < 1.0, rate  # some guesses right, some wrong: both paths ran


def test_draft_cache_reused_across_sequences(target, drafts, plain):
    """One DraftModel for several generations: its cache follows whatever sequence it is given."""
    draft = DraftModel(drafts["noisy"], 4)
    for prompt in _prompts(3, seed=2) + _prompts(1, seed=2):  # the first prompt again: a full prefix hit
        seq, _ = _run(target, prompt, draft, max_new_tokens=40, stop_token_ids=[])
        assert seq.tokens == plain[tuple(prompt)]


@pytest.mark.parametrize("spec", ["lookup", "draft"])
def test_stop_id_and_length_inside_an_accepted_run(target, plain, spec):
    """A stop id or the length limit that falls inside a run of accepted guesses ends the answer there."""
    for prompt in _prompts(2, seed=3):
        free = plain[tuple(prompt)]
        make = (lambda: PromptLookup(8)) if spec == "lookup" else (lambda: DraftModel(target, 8))
        for stop in sorted(set(free[3:]))[:3]:
            seq, _ = _run(target, prompt, make(), max_new_tokens=40, stop_token_ids=[stop])
            assert seq.tokens == free[: free.index(stop) + 1] and seq.finish_reason == "stop"
        for limit in (1, 2, 7, 13):
            seq, _ = _run(target, prompt, make(), max_new_tokens=limit, stop_token_ids=[])
            assert seq.tokens == free[:limit] and seq.finish_reason == "length"


def test_batch_runs_plain_then_speculates_alone(target, monkeypatch):
    """Several prompts: plain batched steps, speculation once one remains; one token per prompt per list."""
    import qwen2_pure.speculative as speculative
    calls = []
    real = speculative.speculative_step
    monkeypatch.setattr(speculative, "speculative_step", lambda *a: calls.append(1) or real(*a))
    prompts = _prompts(3, seed=5)
    free = [q.generate(target, [p], max_new_tokens=40, stop_token_ids=[])[0] for p in prompts]
    stops = [free[0][4], free[2][10]]  # rows 0 and 2 end early, row 1 goes on alone
    plain = [f[: min([i for i, t in enumerate(f) if t in stops], default=len(f) - 1) + 1] for f in free]
    got = [[] for _ in prompts]
    steps = 0
    for step in q.stream_generate(target, prompts, max_new_tokens=40, stop_token_ids=stops,
                                  assistant_model=target, num_assistant_tokens=4):
        steps += 1
        for row, tok in zip(got, step):
            if tok is not None:
                row.append(tok)
    assert got == plain
    assert steps == max(len(g) for g in got)  # one list per token, a speculative step's included
    assert calls and len(plain[1]) > max(len(plain[0]), len(plain[2])) + 4  # it did speculate, alone


# ---- sampling: the target's distribution ---------------------------------------------------------------------

def _bound(p: torch.Tensor, n: int) -> torch.Tensor:
    """5 standard deviations of a frequency estimated from n draws (a failure by chance: < 1e-5 per id)."""
    return 5 * torch.sqrt(p * (1 - p) / n) + 1.0 / n


@pytest.mark.parametrize("case", ["draft", "one-hot", "q beyond p's support"])
def test_accept_or_resample_follows_p(case):
    """The first token a step emits, over 20,000 draws, has the target's distribution p, not q."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.30, 0.05, 0.20, 0.0, 0.15, 0.10, 0.12, 0.08])
    if case == "draft":
        q_ = torch.tensor([0.05, 0.30, 0.10, 0.05, 0.25, 0.05, 0.10, 0.10])
    elif case == "one-hot":
        q_ = None  # prompt lookup: the guess is fixed
    else:
        q_ = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.5])  # mass where p has none
    n = 20_000
    counts = torch.zeros(8)
    accepted = 0
    for _ in range(n):
        x = 2 if q_ is None else int(torch.multinomial(q_, 1, generator=g))
        ok, tok = accept_or_resample(p, q_, x, g)
        accepted += ok
        counts[tok] += 1
    freq = counts / n
    assert ((freq - p).abs() <= _bound(p, n)).all(), (freq, p)
    if q_ is not None and case == "draft":
        assert ((q_ - p).abs() > _bound(p, n)).any()  # the test tells p from q
        assert abs(accepted / n - torch.minimum(p, q_).sum()) <= _bound(torch.tensor(0.5), n)  # Leviathan's alpha
    if q_ is None:
        assert abs(accepted / n - p[2]) <= _bound(p[2], n)


@pytest.mark.parametrize("spec", ["lookup", "draft"])
def test_verify_on_model_logits_follows_p(target, drafts, spec):
    """The first token a speculative step emits, over 10,000 verifications of a model's logits for [last token,
    guess], follows the target's distribution after the row's penalty and warpers (not the raw softmax, not q)."""
    from types import SimpleNamespace

    from qwen2_pure.sampling import PenaltyState, process_logits
    from qwen2_pure.speculative import _verify
    prompt = _prompts(1, seed=7)[0]
    params = SamplingParams(temperature=1.5, top_k=6, repetition_penalty=1.3)
    with torch.inference_mode():
        logits = target(torch.tensor([prompt + [0]]))[0, -2:].float()  # position 0 (the guess's) and 1
        draft_logits = drafts["noisy"](torch.tensor([prompt]))[0, -1:].float()
        penalties = PenaltyState([prompt], V)
        p = torch.softmax(process_logits(penalties.apply(logits[:1], 1.3), temperature=1.5, top_k=6, top_p=1.0,
                                         min_p=0.0), -1)[0]
        q_ = torch.softmax(process_logits(draft_logits, temperature=1.5, top_k=6, top_p=1.0, min_p=0.0), -1)
    g = torch.Generator().manual_seed(0)
    fixed = int(torch.topk(p, 2).indices[1])  # prompt lookup's guess: the second most likely id
    n, counts = 10_000, torch.zeros(V)
    for _ in range(n):
        row = SimpleNamespace(seq=SimpleNamespace(params=params), penalties=PenaltyState([prompt], V), generator=g)
        if spec == "lookup":
            emitted = _verify(row, logits, [fixed], None)
        else:
            guess = int(torch.multinomial(q_[0], 1, generator=g))
            emitted = _verify(row, logits, [guess], q_)
        counts[emitted[0]] += 1
    freq = counts / n
    assert ((freq - p).abs() <= _bound(p, n)).all(), (freq[p > 0], p[p > 0])
    raw = torch.softmax(logits[0], -1)
    assert ((raw - p).abs() > _bound(p, n)).any()  # the check tells the processed p from the raw softmax
    if spec == "draft":
        assert ((q_[0] - p).abs() > _bound(p, n)).any()  # and from q


def test_sampling_is_seeded(target, drafts):
    """End to end with sampling, penalties and warpers: runs, and the seed decides every token."""
    prompt = _prompts(1, seed=6)[0]
    kw = dict(max_new_tokens=20, stop_token_ids=[], temperature=0.8, top_k=20, repetition_penalty=1.1, seed=3)
    for spec in ({"prompt_lookup_num_tokens": 4}, {"assistant_model": drafts["noisy"]}):
        a = q.generate(target, [prompt], **kw, **spec)
        assert q.generate(target, [prompt], **kw, **spec) == a
        assert len(a[0]) == 20


# ---- arguments ----------------------------------------------------------------------------------------------

def test_arguments_are_checked(target):
    with pytest.raises(Qwen2PureError, match="give one"):
        make_speculator(prompt_lookup_num_tokens=3, assistant_model=target)
    for kw, name in (({"prompt_lookup_num_tokens": 0}, "prompt_lookup_num_tokens"),
                     ({"assistant_model": target, "num_assistant_tokens": 0}, "num_assistant_tokens"),
                     ({"num_assistant_tokens": 1.5}, "num_assistant_tokens")):
        with pytest.raises(Qwen2PureError, match=name):
            q.generate(target, [[1, 2, 3]], max_new_tokens=4, **kw)
    with pytest.raises(Qwen2PureError, match="assistant_model"):
        make_speculator(assistant_model="Qwen/Qwen2.5-0.5B")
    assert make_speculator() is None


# ---- front ends ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_dir(demo_tokenizer_dir, tmp_path_factory):
    from hf_utils import make_chat_checkpoint
    return make_chat_checkpoint(tmp_path_factory.mktemp("spec_chat"), demo_tokenizer_dir, 24)


def test_stop_string_inside_a_run(chat_dir):
    """stream_text: the same text as plain decoding, and a stop string inside an accepted run ends it there."""
    model, tok = q.load_model(chat_dir), q.load_tokenizer(chat_dir)
    prompt = "the water of the people of the water"
    plain = "".join(q.stream_text(model, tok, prompt, max_new_tokens=24))
    words = plain.split()
    assert len(words) > 6
    for stop in (words[2], words[3] + " " + words[4], words[-1]):
        want = "".join(q.stream_text(model, tok, prompt, max_new_tokens=24, stop=[stop]))
        for kw in ({"prompt_lookup_num_tokens": 6}, {"assistant_model": model, "num_assistant_tokens": 6}):
            assert "".join(q.stream_text(model, tok, prompt, max_new_tokens=24, **kw)) == plain
            assert "".join(q.stream_text(model, tok, prompt, max_new_tokens=24, stop=[stop], **kw)) == want


def test_cli_flags(chat_dir, capsys):
    from qwen2_pure.cli import main
    prompt = "rewrite: the time of the people was the time of the water"
    outs = {}
    for extra in ([], ["--prompt-lookup", "4"], ["--draft-model", str(chat_dir), "--draft-tokens", "3"]):
        assert main(["generate", "--model", str(chat_dir), "--prompt", prompt, *extra]) == 0
        outs[tuple(extra)] = capsys.readouterr().out
    assert len(set(outs.values())) == 1 and len(outs[()]) > 10
    assert main(["generate", "--model", str(chat_dir), "--prompt", "x", "--prompt-lookup", "0"]) == 2
    assert "--prompt-lookup" in capsys.readouterr().err
    assert main(["generate", "--model", str(chat_dir), "--prompt", "x", "--prompt-lookup", "2",
                 "--draft-model", str(chat_dir)]) == 2
    assert "give one" in capsys.readouterr().err


def test_chat_session_speculates(chat_dir):
    import io

    from qwen2_pure.cli import ChatSession
    model, tok = q.load_model(chat_dir), q.load_tokenizer(chat_dir)
    answers = []
    for speculation in ({}, {"prompt_lookup_num_tokens": 3}, {"assistant_model": DraftModel(model, 3)}):
        out = io.StringIO()
        lines = iter(["the water of the people", "the people of the water", ":q"])
        ChatSession(model, tok, out=out, input_fn=lambda _: next(lines), speculation=speculation).run()
        answers.append(out.getvalue())
    assert answers[0] == answers[1] == answers[2]


def test_server_with_a_draft_model(chat_dir):
    """create_app(speculator=DraftModel): an HTTP completion gives plain greedy's text, every guess accepted."""
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    import http.client
    import json
    import socket
    import threading
    import time

    from qwen2_pure.serve.app import create_app
    model, tok = q.load_model(chat_dir), q.load_tokenizer(chat_dir)
    prompt = "the water of the people of the water of the people"
    want = tok.decode(q.generate(model, [tok.encode(prompt)], max_new_tokens=20)[0], skip_special_tokens=True)
    app = create_app(model, tok, slots=2, max_seq_len=128, speculator=DraftModel(model, 4))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
            time.sleep(0.02)
        conn = http.client.HTTPConnection(*sock.getsockname(), timeout=60)
        body = {"model": "qwen2", "prompt": prompt, "max_tokens": 20, "temperature": 0}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        assert json.loads(r.read())["choices"][0]["text"] == want
        stats = app.state.engine.stats
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
    assert stats["spec_proposed"] > 0 and stats["spec_accepted"] == stats["spec_proposed"]


@pytest.mark.parametrize("spec", ["lookup", "draft"])
def test_prompt_cache_after_a_speculative_finish(target, plain, spec):
    """A sequence that ends inside an accepted run leaves the same prompt cache as plain decoding: its tokens but
    the last, with their keys/values (what the chat command reuses next turn)."""
    prompt = _prompts(1, seed=3)[0]
    free = plain[tuple(prompt)]
    stop = free[9]
    caches = []
    for kw in ({}, {"prompt_lookup_num_tokens": 8} if spec == "lookup" else {"assistant_model": target,
                                                                              "num_assistant_tokens": 8}):
        cache = q.PromptCache()
        [out] = q.generate(target, [prompt], max_new_tokens=40, stop_token_ids=[stop], prompt_cache=cache, **kw)
        assert out == free[: free.index(stop) + 1]
        caches.append(cache)
    assert caches[1].tokens == caches[0].tokens == prompt + out[:-1]
    torch.testing.assert_close(caches[1].k, caches[0].k, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches[1].v, caches[0].v, rtol=1e-4, atol=1e-4)


def test_serve_command_passes_the_speculator(chat_dir, monkeypatch):
    """`qwen2-pure serve --draft-model SRC` / `--prompt-lookup N` reach the app as a proposer."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import qwen2_pure.serve.app as app
    from qwen2_pure.cli import main
    got = []
    monkeypatch.setattr(app, "serve", lambda model, tok, **kw: got.append(kw["speculator"]))
    base = ["serve", "--model", str(chat_dir), "--port", "0"]
    assert main(base + ["--draft-model", str(chat_dir), "--draft-tokens", "2"]) == 0
    assert main(base + ["--prompt-lookup", "7"]) == 0
    assert main(base) == 0
    assert isinstance(got[0], DraftModel) and got[0].num_tokens == 2
    assert isinstance(got[1], PromptLookup) and got[1].num_tokens == 7
    assert got[2] is None
