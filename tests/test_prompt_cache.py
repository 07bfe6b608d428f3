"""The prompt cache (qwen2_pure/prompt_cache.py): reusing the keys/values of a shared prefix gives what a full
prefill gives — greedy tokens equal, logits within the distance transformers itself shows between a prefill split
in two and a full one on this machine — in the Python API, through a file, in the chat command and in the server.
"""

from __future__ import annotations

import pytest
import torch

import qwen2_pure as q
from hf_utils import VOCAB, _cache_kwarg, assert_within_reference, load_hf, make_hf_checkpoint
from qwen2_pure.engine import Engine, Sequence
from qwen2_pure.errors import Qwen2PureError
from qwen2_pure.prompt_cache import MIN_REUSE, PrefixPool, PromptCache, common_prefix


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("pc")
    make_hf_checkpoint(path, heads=14, kv_heads=2, head_dim=16, layers=2, intermediate=64)
    return path


def tokens(n, seed):
    return torch.randint(0, VOCAB - 2, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
def test_next_turn_reuses_the_cache_and_generates_the_same_tokens(ckpt, fast):
    model = q.load_model(ckpt, settings=q.Settings(fast=fast))
    first = tokens(40, 0)
    cache = PromptCache()
    [answer] = q.generate(model, [first], max_new_tokens=10, stop_token_ids=[], prompt_cache=cache)
    # the cache holds the prompt and the answer but its last token (sampled, never fed)
    assert cache.tokens == first + answer[:-1] and cache.k.shape[2] == len(cache)
    second = first + answer + tokens(12, 1)
    plain = q.generate(model, [second], max_new_tokens=15, stop_token_ids=[])
    assert q.generate(model, [second], max_new_tokens=15, stop_token_ids=[], prompt_cache=cache) == plain
    assert cache.tokens[:len(second)] == second


def test_engine_prefills_only_the_new_tokens(ckpt):
    model = q.load_model(ckpt)
    prefix = tokens(50, 2)
    cache = PromptCache()
    q.generate(model, [prefix + [7]], max_new_tokens=2, stop_token_ids=[], prompt_cache=cache)
    cache_tokens = list(cache.tokens)
    engine = Engine(model, max_batch=3, max_seq_len=128)
    # one sequence with the cache, two without, admitted together: one shared forward, one alone
    seqs = [Sequence(prefix + [7] + tokens(4, 3), max_new_tokens=6, stop_token_ids=[], prompt_cache=cache),
            Sequence(tokens(9, 4), max_new_tokens=6, stop_token_ids=[]),
            Sequence(tokens(30, 5), max_new_tokens=6, stop_token_ids=[])]
    engine.add(seqs)
    while engine.rows:
        engine.step()
    reused = common_prefix(cache_tokens, seqs[0].prompt)
    assert reused >= 51 and engine.stats["prefix_hits"] == 1 and engine.stats["prefix_tokens_reused"] == reused
    assert engine.stats["prefill_tokens"] == 55 - reused + 9 + 30
    for s in seqs:
        assert s.tokens == q.generate(model, [s.prompt], max_new_tokens=6, stop_token_ids=[])[0]


def test_prefix_logits_within_transformers_split_prefill_distance(ckpt):
    """Our prefill of a prompt's end over a copied prefix against our full prefill, bounded by transformers' own
    distance between a prefill split at the same place and a full one."""
    model, hf = q.load_model(ckpt), load_hf(ckpt)
    x = torch.tensor([tokens(48, 6)])
    n = 31
    with torch.no_grad():
        full = model(x)[:, n:]
        cache = model.new_cache(1, 48)
        model(x[:, :n], cache=cache, input_pos=torch.arange(n), kv_len=n)
        saved = PromptCache(x[0, :n].tolist(), cache.k[:, 0, :, :n].clone(), cache.v[:, 0, :, :n].clone())
        fresh = model.new_cache(1, 48)
        fresh.k[:, 0, :, :n], fresh.v[:, 0, :, :n] = saved.k, saved.v
        split = model(x[:, n:], cache=fresh, input_pos=torch.arange(n, 48), kv_len=48)
        hf_full = hf(x).logits[:, n:]
        out = hf(x[:, :n], use_cache=True)
        hf_split = hf(x[:, n:], use_cache=True, **{_cache_kwarg(hf): out.past_key_values}).logits
    assert_within_reference(split, full, hf_split, hf_full, what="prefix from a prompt cache vs full prefill")


def test_save_and_load_a_prefilled_prefix(ckpt, tmp_path):
    model = q.load_model(ckpt)
    cache = PromptCache()
    prompt = tokens(30, 7)
    q.generate(model, [prompt], max_new_tokens=3, stop_token_ids=[], prompt_cache=cache)
    path = cache.save(tmp_path / "system.safetensors")
    loaded = PromptCache.load(path, model)
    assert loaded.tokens == cache.tokens and torch.equal(loaded.k, cache.k) and torch.equal(loaded.v, cache.v)
    follow = prompt + tokens(6, 8)
    assert q.generate(model, [follow], max_new_tokens=5, stop_token_ids=[], prompt_cache=loaded) == \
        q.generate(model, [follow], max_new_tokens=5, stop_token_ids=[])
    # another dtype is another model's cache: refused, naming the file and the field
    with pytest.raises(Qwen2PureError, match=r"system\.safetensors.*dtype 'float32' \(this model: 'bfloat16'\)"):
        PromptCache.load(path, q.load_model(ckpt, dtype="bfloat16"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(Qwen2PureError, match="junk.safetensors: cannot read"):
        PromptCache.load(tmp_path / "junk.safetensors")
    with pytest.raises(Qwen2PureError, match="empty"):
        PromptCache().save(tmp_path / "empty.safetensors")


def test_a_cache_of_another_model_is_not_reused(ckpt):
    model = q.load_model(ckpt)
    cache = PromptCache()
    prompt = tokens(30, 9)
    q.generate(model, [prompt], max_new_tokens=2, stop_token_ids=[], prompt_cache=cache)
    bf16 = q.load_model(ckpt, dtype="bfloat16")
    assert not cache.usable_for(bf16)
    q.generate(bf16, [prompt + [1]], max_new_tokens=2, stop_token_ids=[], prompt_cache=cache)  # recomputed
    assert cache.k.dtype == torch.bfloat16


def test_prefix_pool_lookup_and_budget():
    def entry(toks, fill=0.0):
        kv = torch.full((2, 1, len(toks), 4), fill)
        return PromptCache(toks, kv, kv.clone(), {"m": 1})

    base = list(range(100, 140))
    pool = PrefixPool(max_bytes=3 * entry(base).nbytes)
    pool.add(entry(base[:20]))
    pool.add(entry(base))  # holds base[:20]: the shorter entry is dropped
    assert len(pool) == 1
    hit, n = pool.lookup(base[:30] + [1, 2])
    assert hit is not None and n == 30
    assert pool.lookup(base[:MIN_REUSE - 1] + [5]) == (None, 0)  # too short to be worth a copy
    for i in range(4):  # beyond the budget the least recently used entries go
        pool.add(entry([i] * 40))
    assert pool.nbytes <= pool.max_bytes and len(pool) == 3
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0


def test_chat_session_reuses_the_conversation(monkeypatch, tmp_path, demo_tokenizer_dir):
    """Turn after turn, the chat command prefills only what is new; the answers are those of a fresh session."""
    import io

    from hf_utils import make_chat_checkpoint
    from qwen2_pure.cli import ChatSession
    from qwen2_pure.engine import Engine as CoreEngine

    path = make_chat_checkpoint(tmp_path / "chat", demo_tokenizer_dir, 12)
    model, tok = q.load_model(path), q.load_tokenizer(path)
    prefilled = []
    original = CoreEngine.add

    def add(self, seqs):
        out = original(self, seqs)
        prefilled.append(self.stats["prefill_tokens"])
        return out

    monkeypatch.setattr(CoreEngine, "add", add)

    def run(session_inputs, reuse):
        lines = iter(session_inputs)
        out = io.StringIO()
        session = ChatSession(model, tok, seed=0, out=out, input_fn=lambda _: next(lines))
        if not reuse:
            session.prompt_cache = None
        with pytest.raises(StopIteration):
            session.run()
        return [a for _, a in session.history]

    turns = ["hello there", "tell me more", "and then"]
    with_cache = run(turns, True)
    cached_prefill = list(prefilled)
    prefilled.clear()
    assert with_cache == run(turns, False)
    # turns 2 and 3 prefill far less than the whole conversation
    assert all(c < f for c, f in zip(cached_prefill[1:], prefilled[1:])), (cached_prefill, prefilled)


def test_server_reuses_a_shared_system_prompt(tmp_path, demo_tokenizer_dir):
    """A request sharing a long prefix with a finished one copies its keys/values (a hit in the engine's pool)
    and answers exactly what a server without the pool answers."""
    from hf_utils import make_chat_checkpoint
    from qwen2_pure.serve.engine import Engine as ServeEngine

    path = make_chat_checkpoint(tmp_path / "srv", demo_tokenizer_dir, 12)
    model, tok = q.load_model(path), q.load_tokenizer(path)
    system = {"role": "system", "content": "You are a careful assistant. " * 8}
    prompts = [tok.encode(tok.apply_chat_template([system, {"role": "user", "content": text}]))
               for text in ("first question", "a second one", "and a third")]
    answers = {}
    for mb in (64, 0):
        engine = ServeEngine(model, tok, slots=2, max_seq_len=256, prompt_cache_mb=mb).start()
        try:
            answers[mb] = [engine.generate(p, 12, timeout=60)[0] for p in prompts]
            hits = engine.stats["prefix_hits"]
        finally:
            engine.stop()
        assert hits == (2 if mb else 0)
    assert answers[64] == answers[0]
