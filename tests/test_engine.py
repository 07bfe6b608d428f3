"""The generation engine (qwen2_pure/engine.py) driven directly: continuous batching, compaction, the compiled
decode step, degenerate sampling values, and failure isolation in every code path.

Isolation is checked by injecting a failure into ONE row of a batch of three, once per code path (prefill,
also of a row reusing a pooled prefix; decode; sampling, also inside a call shared with a neighbour;
detokenization; stop strings): that row ends with `finish_reason == "error"` and its own message, every other
row's tokens are exactly what it generates alone (`qwen2_pure.generate`), and the engine goes on serving new
sequences.

Token-level tests use a tiny random Qwen2 from `hf_utils.make_hf_checkpoint` (1 layer, 14 query heads over 2 KV
heads, vocabulary 257) whose greedy continuations vary with the whole prompt, so a wrong mask, position or
cache slot changes the tokens. Text tests (detokenization, stop strings) use `make_chat_checkpoint`, with the
real Qwen2.5 tokenizer. The compiled step (torch.compile on CPU) is built once per module: the tests that use
it keep at least two rows running and an attention mask, so the first compilation serves them all.
"""

from __future__ import annotations

import random

import pytest
import torch

import qwen2_pure as q
from qwen2_pure import engine as engine_module
from qwen2_pure.engine import Engine, Sequence
from qwen2_pure.fast import decode_step_for
from qwen2_pure.sampling import SamplingParams
from qwen2_pure.tokenizer import TextStream

MARK = 251  # a token id no prompt of these tests contains, except a prompt meant to fail
N = 10  # new tokens per sequence, unless a test says otherwise


# ---- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from hf_utils import make_hf_checkpoint
    path = tmp_path_factory.mktemp("engine_ckpt")
    make_hf_checkpoint(path, heads=14, kv_heads=2, head_dim=16, layers=1, intermediate=64)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return q.load_model(ckpt)


@pytest.fixture(scope="module")
def compiled(ckpt):
    """The same checkpoint with `compile=True`: the engine calls `fast.decode_step_for(model)`."""
    return q.load_model(ckpt, settings=q.Settings(compile=True))


@pytest.fixture(scope="module")
def chat(demo_tokenizer_dir, tmp_path_factory):
    """A tiny random Qwen2 with the demo's tokenizer, whose greedy text is varied English words."""
    from hf_utils import make_chat_checkpoint
    path = make_chat_checkpoint(tmp_path_factory.mktemp("engine_chat"), demo_tokenizer_dir, 16)
    return q.load_model(path), q.load_tokenizer(path)


# ---- helpers ----------------------------------------------------------------------------------------------

def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, MARK) for _ in range(length)]


def seq(ids, n=N, **params) -> Sequence:
    return Sequence(prompt=list(ids), params=SamplingParams(**params), max_new_tokens=n, stop_token_ids=[])


def alone(model, ids, n=N, **sampling) -> list[int]:
    """The tokens `ids` gets from `qwen2_pure.generate` alone (greedy unless `sampling` says otherwise)."""
    return q.generate(model, [list(ids)], max_new_tokens=n, stop_token_ids=[], **sampling)[0]


def run(engine: Engine, seqs, joins=None) -> list:
    """Add `seqs`, then step until every row is done; `joins` {k: sequences} adds those before step k (1-based),
    while the others run. Returns every StepOutput."""
    joins = dict(joins or {})
    with torch.inference_mode():  # as generate and the server drive it
        outputs = engine.add(list(seqs))
        k = 0
        while engine.rows or joins:
            k += 1
            if k in joins:
                outputs += engine.add(joins.pop(k))
            outputs += engine.step()
    return outputs


def text_of(outputs, s: Sequence) -> str:
    return "".join(o.text for o in outputs if o.seq is s)


def assert_failed(s: Sequence, message: str) -> None:
    assert s.finish_reason == "error", (s.finish_reason, s.tokens)
    assert s.error and message in s.error, s.error


def assert_as_alone(model, seqs, expected) -> None:
    for s, want in zip(seqs, expected):
        assert s.error is None, s.error
        assert s.finish_reason == "length" and s.tokens == want, (s.prompt[:5], s.tokens, want)


def assert_still_serves(engine: Engine, model) -> None:
    """After a failure, the engine takes new sequences and decodes them as `generate` alone does."""
    fresh = [seq(prompt(6, 100), 6), seq(prompt(13, 101), 4)]
    expected = [alone(model, s.prompt, s.max_new_tokens) for s in fresh]
    run(engine, fresh)
    assert_as_alone(model, fresh, expected)
    assert not engine.rows and engine.t == 0 and not engine.mask.any()


def check_one_row_fails(model, good, bad, expected, message, bad_tokens, max_seq_len=64) -> None:
    """Run good[0], bad, good[1] as one batch: `bad` fails with `message` after `bad_tokens`, the others
    decode as alone (`expected`), and the engine goes on serving."""
    engine = Engine(model, max_batch=3, max_seq_len=max_seq_len)
    run(engine, [good[0], bad, good[1]])
    assert_failed(bad, message)
    assert bad.tokens == bad_tokens
    assert_as_alone(model, good, expected)
    assert_still_serves(engine, model)


# ---- continuous batching and compaction -------------------------------------------------------------------

def test_fixture_model_is_context_sensitive(model):
    """Guard: greedy output is varied and depends on the first prompt token, so equality checks mean something."""
    ids = prompt(12, 0)
    out = alone(model, ids)
    assert len(set(out)) >= 4, out
    assert alone(model, [(ids[0] + 1) % MARK] + ids[1:]) != out


def test_rows_of_different_lengths_and_joining_rows_equal_generate_alone(model):
    """Sequences of random prompt lengths and budgets, admitted whenever a row frees (mid-way through the
    others), on a time axis of 28 slots that fills and is compacted: each gives `generate`'s tokens alone."""
    rng = random.Random(0)
    seqs = [seq(prompt(rng.randint(1, 16), i), rng.randint(2, 12)) for i in range(8)]
    expected = [alone(model, s.prompt, s.max_new_tokens) for s in seqs]
    engine = Engine(model, max_batch=3, max_seq_len=28)
    pending = list(seqs)
    axis_compacted = False
    with torch.inference_mode():
        engine.add([pending.pop(0), pending.pop(0)])  # two start together (left padding), the rest join later
        while engine.rows or pending:
            if pending and engine.free_rows and rng.random() < 0.6:
                engine.add([pending.pop(0) for _ in range(min(engine.free_rows, len(pending), rng.randint(1, 2)))])
            t = engine.t
            engine.step()
            axis_compacted |= bool(engine.rows) and engine.t < t  # the full axis was right-aligned to the longest row
    assert_as_alone(model, seqs, expected)
    assert axis_compacted and engine.stats["compactions"] >= 1 and engine.stats["max_batch"] == 3
    assert engine.t == 0 and not engine.mask.any()


def _joining_schedule():
    """A long prompt with a short answer beside two short prompts with long answers; the third joins after one
    step. The axis (24 slots) fills at step 5 and is compacted; the last two rows end together, so at least
    two rows run at every step and every step has a mask (the compiled step is built once)."""
    first = [seq(prompt(20, 1), 4), seq(prompt(5, 2), 18)]
    joining = seq(prompt(3, 3), 17)
    return first, joining


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_compaction_and_joining_rows(model, compiled, mode):
    m = compiled if mode == "compiled" else model
    first, joining = _joining_schedule()
    expected = [alone(model, s.prompt, s.max_new_tokens) for s in first + [joining]]
    engine = Engine(m, max_batch=3, max_seq_len=24)
    calls = decode_step_for(m).calls
    run(engine, first, joins={2: [joining]})
    assert_as_alone(model, first + [joining], expected)
    assert engine.stats["compactions"] >= 1 and engine.stats["max_batch"] == 3
    if mode == "compiled":
        assert engine.step_fn is decode_step_for(m)
        assert decode_step_for(m).calls - calls == engine.stats["steps"]  # every decode step ran compiled
    else:
        assert engine.step_fn is None and decode_step_for(m).calls == calls == 0


def test_compiled_step_gives_the_eager_tokens(model, compiled):
    """`Settings(compile=True)`: a left-padded batch, then other prompt lengths (another cache length), give
    the eager tokens, and the compiled step ran for every decode step."""
    step = decode_step_for(compiled)
    for prompts in ([prompt(7, 10), prompt(3, 11)], [prompt(21, 12), prompt(12, 13)]):
        eager = q.generate(model, prompts, max_new_tokens=8, stop_token_ids=[])
        before = step.calls
        assert q.generate(compiled, prompts, max_new_tokens=8, stop_token_ids=[]) == eager
        assert step.calls - before == 7  # one compiled call per decode step (the first token is the prefill's)
    assert step.calls > 0


def test_engine_called_directly_builds_no_autograd_graph(model):
    engine = Engine(model, max_batch=2, max_seq_len=32)
    engine.add([seq(prompt(5, 90), 4)])
    engine.step()
    assert not engine.cache.k.requires_grad and engine.cache.k.grad_fn is None


# ---- failure isolation: one injected failure per code path --------------------------------------------------

def _wrap_forward(monkeypatch, model, fail):
    """Make model(...) raise RuntimeError when `fail(input_ids, position_ids)` is true."""
    real = model.forward

    def forward(input_ids, *args, **kwargs):
        if fail(input_ids, kwargs.get("position_ids")):
            raise RuntimeError("injected failure")
        return real(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)


@pytest.mark.parametrize("when", ["together", "joining"])
def test_prefill_failure_ends_only_that_row(model, monkeypatch, when):
    """A prompt whose prefill raises (it holds a marker token) fails alone, whether it was prefilled in one
    batch with the others or joined (moving them on the axis) while they ran."""
    good = [seq(prompt(9, 20)), seq(prompt(4, 21))]
    bad = seq(prompt(30, 22)[:10] + [MARK] + prompt(30, 22)[10:])
    expected = [alone(model, s.prompt) for s in good]
    _wrap_forward(monkeypatch, model, lambda ids, pos: ids.shape[1] > 1 and bool((ids == MARK).any()))
    engine = Engine(model, max_batch=3, max_seq_len=64)
    if when == "together":
        outputs = run(engine, [good[0], bad, good[1]])
    else:
        outputs = run(engine, good, joins={3: [bad]})
    assert_failed(bad, "injected failure")
    assert bad.tokens == []
    [out] = [o for o in outputs if o.seq is bad]
    assert out.finish_reason == "error" and out.error == bad.error and out.token is None
    assert_as_alone(model, good, expected)
    assert_still_serves(engine, model)


def test_prefill_failure_of_a_row_with_a_reused_prefix(model, monkeypatch):
    """With a prefix pool, rows that reuse a finished sequence's keys/values are prefilled alone, after the
    fresh rows' shared forward: a failure in one of them ends that row only."""
    from qwen2_pure.prompt_cache import MIN_REUSE, PrefixPool
    base = prompt(MIN_REUSE + 4, 23)
    fresh, shared = seq(prompt(9, 24)), seq(base + prompt(5, 25))
    bad = seq(base + [MARK] + prompt(5, 26))
    expected = [alone(model, s.prompt) for s in (fresh, shared)]
    engine = Engine(model, max_batch=3, max_seq_len=64, prefix_pool=PrefixPool(1 << 20))
    run(engine, [seq(base, 3)])  # leaves base and its answer in the pool
    _wrap_forward(monkeypatch, model, lambda ids, pos: ids.shape[1] > 1 and bool((ids == MARK).any()))
    run(engine, [bad, fresh, shared])
    assert engine.stats["prefix_hits"] == 2
    assert_failed(bad, "injected failure")
    assert_as_alone(model, [fresh, shared], expected)
    assert_still_serves(engine, model)


def test_decode_failure_ends_only_that_row(model, monkeypatch):
    """A row whose decode step raises (it is the only one to reach position 62) fails after the tokens it had;
    the batched step that raised is retried row by row, and the others never notice."""
    good = [seq(prompt(9, 30)), seq(prompt(15, 31))]
    bad = seq(prompt(60, 32))
    expected = [alone(model, s.prompt) for s in good]
    before_failure = alone(model, bad.prompt, 3)  # positions 60 and 61 are fed; feeding 62 fails
    _wrap_forward(monkeypatch, model, lambda ids, pos: ids.shape[1] == 1 and bool((pos >= 62).any()))
    check_one_row_fails(model, good, bad, expected, "injected failure", before_failure, max_seq_len=80)


def test_sampling_failure_ends_only_that_row(model, monkeypatch):
    """process_logits raising for one row's parameters (top_k=7, greedy otherwise) on its third token ends that
    row; the two rows sharing one batched sampling call go on."""
    good = [seq(prompt(9, 40)), seq(prompt(5, 41))]
    bad = seq(prompt(12, 42), top_k=7)
    expected = [alone(model, s.prompt) for s in good]
    before_failure = alone(model, bad.prompt, 2)
    real, calls = engine_module.process_logits, []

    def process_logits(logits, **kw):
        if kw["top_k"] == 7:
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected sampling failure")
        return real(logits, **kw)

    monkeypatch.setattr(engine_module, "process_logits", process_logits)
    check_one_row_fails(model, good, bad, expected, "injected sampling failure", before_failure)


@pytest.mark.parametrize("when", [
    "before-drawing",
    "after-drawing",
])
def test_sampling_failure_in_a_shared_call(model, monkeypatch, when):
    """Two seeded rows with equal parameters are sampled in one call; when that call raises because of one of
    them (its generator), the retry row by row ends that row only, and the other draws what it draws alone."""
    good, bad = seq(prompt(9, 43), temperature=1.0, seed=1), seq(prompt(7, 44), temperature=1.0)
    bad.generator = torch.Generator().manual_seed(2)
    greedy = seq(prompt(5, 45))
    expected = [alone(model, good.prompt, temperature=1.0, seed=1), alone(model, greedy.prompt)]
    real, calls = engine_module.sample_next, []

    def sample_next(logits, *, temperature, generators):
        if generators is not None and any(g is bad.generator for g in generators):
            calls.append(len(generators))
            if len(calls) >= 3:  # from its third token on, alone or not
                if when == "after-drawing":
                    real(logits, temperature=temperature, generators=generators)
                raise RuntimeError("injected sampling failure")
        return real(logits, temperature=temperature, generators=generators)

    monkeypatch.setattr(engine_module, "sample_next", sample_next)
    run(Engine(model, max_batch=3, max_seq_len=64), [good, bad, greedy])
    assert calls == [2, 2, 2, 1]  # sampled together, then the failing call retried row by row
    assert_failed(bad, "injected sampling failure")
    assert len(bad.tokens) == 2
    assert_as_alone(model, [good, greedy], expected)


def _chat_seqs(tok, n=12, **kw):
    texts = ["Hello there", "The meaning of life is", "Write a poem about the sea"]
    return [Sequence(prompt=tok.encode(t), max_new_tokens=n, stop_token_ids=[], **kw) for t in texts]


def test_detokenization_failure_ends_only_that_row(chat, monkeypatch):
    """TextStream.push raising for one row (the one that keeps special tokens) on its fourth token ends that
    row; the others' tokens and text are those of generate alone."""
    model, tok = chat
    a, bad, b = _chat_seqs(tok)
    bad.skip_special_tokens = False
    expected = [alone(model, s.prompt, s.max_new_tokens) for s in (a, b)]
    real, pushes = TextStream.push, []

    def push(self, token_id):
        if not self.skip_special_tokens:
            pushes.append(token_id)
            if len(pushes) == 4:
                raise RuntimeError("injected detokenization failure")
        return real(self, token_id)

    monkeypatch.setattr(TextStream, "push", push)
    engine = Engine(model, max_batch=3, max_seq_len=64, tokenizer=tok)
    outputs = run(engine, [a, bad, b])
    assert_failed(bad, "injected detokenization failure")
    assert len(pushes) == 4
    assert_as_alone(model, [a, b], expected)
    for s, want in zip((a, b), expected):
        assert text_of(outputs, s) == tok.decode(want, skip_special_tokens=True)
    fresh = _chat_seqs(tok, 5)[:2]
    run(engine, fresh)
    assert_as_alone(model, fresh, [alone(model, s.prompt, 5) for s in fresh])


def test_stop_string_failure_ends_only_that_row(chat, monkeypatch):
    """The stop-string search raising for one row ends that row; a neighbour's real stop string still stops it
    (the stop string not returned), another's that never occurs changes nothing."""
    model, tok = chat
    a, bad, b = _chat_seqs(tok)
    expected = [alone(model, s.prompt, s.max_new_tokens) for s in (a, b)]
    full_a = tok.decode(expected[0], skip_special_tokens=True)
    stop = next(f" {w}" for w in full_a.split() if full_a.index(f" {w}") > 0)
    a.stop, bad.stop, b.stop = [stop], ["<boom>"], ["zzz-never"]
    real, releases = TextStream._release, []

    def release(self, text, final):
        if "<boom>" in self.stop:
            releases.append(text)
            if len(releases) == 3:
                raise RuntimeError("injected stop-string failure")
        return real(self, text, final)

    monkeypatch.setattr(TextStream, "_release", release)
    engine = Engine(model, max_batch=3, max_seq_len=64, tokenizer=tok)
    outputs = run(engine, [a, bad, b])
    assert_failed(bad, "injected stop-string failure")
    assert len(bad.tokens) == 3 and bad.tokens == alone(model, bad.prompt, 3)
    assert a.finish_reason == "stop" and a.error is None
    assert text_of(outputs, a) == full_a[:full_a.index(stop)]
    assert a.tokens == expected[0][:len(a.tokens)] and len(a.tokens) < len(expected[0])
    assert_as_alone(model, [b], expected[1:])
    assert text_of(outputs, b) == tok.decode(expected[1], skip_special_tokens=True)


# ---- degenerate sampling values -----------------------------------------------------------------------------

def test_tiny_temperature_is_greedy(model):
    """Temperatures below 1e-5 are greedy (vLLM's rule): 1e-40 does not overflow, it gives the greedy tokens,
    beside a greedy row and a seeded sampling row that are unaffected."""
    greedy, tiny, tiny_filtered = seq(prompt(9, 50)), seq(prompt(14, 51), temperature=1e-40), \
        seq(prompt(4, 52), temperature=1e-40, top_k=3, top_p=0.5, seed=3)
    sampled = seq(prompt(7, 53), temperature=0.8, seed=4)
    expected = [alone(model, s.prompt) for s in (greedy, tiny, tiny_filtered)]
    expected_sampled = alone(model, sampled.prompt, temperature=0.8, seed=4)
    run(Engine(model, max_batch=4, max_seq_len=64), [greedy, tiny, tiny_filtered, sampled])
    assert_as_alone(model, [greedy, tiny, tiny_filtered, sampled], expected + [expected_sampled])
    assert q.generate(model, [tiny.prompt], max_new_tokens=N, temperature=1e-40, stop_token_ids=[]) == [expected[1]]


def test_extreme_repetition_penalty(model):
    """repetition_penalty=1e-300 makes the positive logits of seen tokens +inf: they saturate, so sampling
    (temperature 0.8, seeded) draws among them without error, as generate alone does; greedy too; the
    neighbours are unaffected."""
    sampled = seq(prompt(9, 60), temperature=0.8, repetition_penalty=1e-300, seed=5)
    greedy_penalised = seq(prompt(6, 61), repetition_penalty=1e-300)
    greedy = seq(prompt(11, 62))
    neighbour = seq(prompt(5, 63), temperature=0.8, seed=6)
    expected = [alone(model, sampled.prompt, temperature=0.8, repetition_penalty=1e-300, seed=5),
                alone(model, greedy_penalised.prompt, repetition_penalty=1e-300), alone(model, greedy.prompt),
                alone(model, neighbour.prompt, temperature=0.8, seed=6)]
    batch = [sampled, greedy_penalised, greedy, neighbour]
    run(Engine(model, max_batch=4, max_seq_len=64), batch)
    assert_as_alone(model, batch, expected)
    assert set(sampled.tokens) <= set(sampled.prompt)  # only seen tokens carry the (saturated) mass


def _nan_logits_where(monkeypatch, model, bad):
    """model(...)'s logits become NaN in the rows where `bad(position_ids)` (B,) is true, at decode steps."""
    real = model.forward

    def forward(input_ids, *args, **kwargs):
        out = real(input_ids, *args, **kwargs)
        if input_ids.shape[1] == 1:
            out = out.clone()
            out[bad(kwargs["position_ids"][:, -1])] = float("nan")
        return out

    monkeypatch.setattr(model, "forward", forward)


def test_nan_logits_fail_that_sampled_row(model, monkeypatch):
    """NaN logits for one sampled row (the only one past position 40) fail that row with an error naming the
    non-finite distribution; the seeded row sampled in the same batched call, and a greedy row, go on."""
    bad = seq(prompt(40, 70), temperature=1.0, seed=7)
    same_params = seq(prompt(8, 71), temperature=1.0, seed=8)
    greedy = seq(prompt(12, 72))
    expected = [alone(model, same_params.prompt, temperature=1.0, seed=8), alone(model, greedy.prompt)]
    first = alone(model, bad.prompt, 1, temperature=1.0, seed=7)
    _nan_logits_where(monkeypatch, model, lambda pos: pos >= 40)
    check_one_row_fails(model, [same_params, greedy], bad, expected, "not finite", first)


def test_nan_logits_fail_that_greedy_row(model, monkeypatch):
    """NaN logits for a greedy row are a failure too, not token 0 (argmax of NaN)."""
    bad, good = seq(prompt(40, 80)), seq(prompt(8, 81))
    expected = alone(model, good.prompt)
    _nan_logits_where(monkeypatch, model, lambda pos: pos >= 40)
    run(Engine(model, max_batch=2, max_seq_len=64), [good, bad])
    assert_as_alone(model, [good], [expected])
    assert_failed(bad, "not finite")


def test_logprobs_are_the_raw_distribution_and_processors_shape_the_choice(model):
    """logprobs: log_softmax of the model's raw logits (vLLM's default), checked against a full forward;
    a logits processor (a grammar's mask) decides which tokens may come, for its row only."""
    p = prompt(12, 95)
    engine = Engine(model, max_batch=2, max_seq_len=64)
    allowed = torch.tensor([3, 5, 9])

    def only_allowed(tokens, logits):
        out = torch.full_like(logits, float("-inf"))
        out[allowed] = logits[allowed]
        return out

    watched = Sequence(list(p), max_new_tokens=4, stop_token_ids=[], logprobs=3)
    masked = Sequence(list(p), max_new_tokens=4, stop_token_ids=[], logits_processors=[only_allowed])
    outs = engine.add([watched, masked])
    while engine.rows:
        outs += engine.step()
    assert masked.tokens and all(t in allowed.tolist() for t in masked.tokens)
    assert watched.tokens == alone(model, p)[:4]
    mine = [o for o in outs if o.seq is watched]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([p + watched.tokens[:-1]]))[0, len(p) - 1:].float(), -1)
    for step, o in enumerate(mine):
        assert abs(o.logprob - ref[step, o.token].item()) < 1e-4
        ids = [i for i, _ in o.top_logprobs]
        assert len(ids) == 3 and ids[0] == o.token  # greedy: the chosen token is the most likely
        assert ids == torch.topk(ref[step], 3).indices.tolist()


def test_compiled_batches_of_every_size_equal_eager(tmp_path):
    """The compiled step sees power-of-two batches with the idle rows masked: batches of 1, 2 and 3 (padded to
    4) give the eager tokens (the shape, hidden 224 / intermediate 64, is where a run with a dynamic batch
    dimension and a mixed-capability inductor cache corrupted the heap)."""
    from hf_utils import make_hf_checkpoint
    make_hf_checkpoint(tmp_path, heads=14, kv_heads=2, head_dim=16, layers=1, intermediate=64)
    eager = q.load_model(tmp_path, settings=q.Settings(fast=False))
    compiled = q.load_model(tmp_path, settings=q.Settings(fast=False, compile=True))
    for prompts in ([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], [[3, 4, 5]], [[1, 2], [7] * 6, [9, 8, 7, 6]]):
        assert q.generate(compiled, prompts, max_new_tokens=4, stop_token_ids=[]) == \
            q.generate(eager, prompts, max_new_tokens=4, stop_token_ids=[])
    assert decode_step_for(compiled).calls == 9
