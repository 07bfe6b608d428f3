"""Sampling: parity with transformers' logits processors, validation, penalties, seeded draws.

The transformers processors come from a real `GenerationConfig` through a tiny Qwen2 model's own
`_get_logits_processor`, so the defaults (top_k=50 when absent) and the order are transformers', not ours.
"""

import math
import warnings

import pytest
import torch

from qwen2_pure.errors import Qwen2PureError
from qwen2_pure.sampling import (
    PenaltyState,
    SamplingParams,
    make_generators,
    process_logits,
    sample_next,
    validate_sampling,
)

V = 80  # > 50, so transformers' implicit top_k=50 changes the result when it applies


# ----------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # peaked distributions, so top-p/min-p actually cut
    return transformers, model


def hf_processors(hf, d: dict, prompt_len: int):
    """The LogitsProcessorList that `model.generate()` builds for a model whose generation_config.json is `d`."""
    transformers, model = hf
    model.generation_config = transformers.GenerationConfig(**d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gc, _ = model._prepare_generation_config(None)
        return model._get_logits_processor(gc, input_ids_seq_length=prompt_len, device="cpu", model_kwargs={}), gc


def make_logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(6, V, generator=g) * 3.0  # about half negative
    x[0, 10:14] = x[0].max() + 1.0  # a 4-way tie at the top
    x[1, :5] = x[1, 5]  # ties in the middle
    x[1, 40:50] = -math.inf  # masked entries
    x[2, 3] = x[2].max() + 0.5  # one clear winner...
    x[2, 7] = x[2, 3]  # ...tied with a second token
    x[3, 20:] = -math.inf  # only 20 finite tokens: fewer than the default top_k
    x[4] = 0.0  # all equal
    x[4, 4:] = -math.inf  # four equal tokens, the rest masked: top_p boundaries are exact
    x[5, 0] = 0.0  # an exact zero (the repetition penalty leaves it alone)
    return x


def make_history() -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    ids = torch.randint(0, V, (6, 12), generator=g)
    ids[:, 0] = 10  # in a tie group of row 0
    ids[:, 1] = 5  # repeated id, penalised once
    ids[:, 2] = 5
    ids[:, 3] = 3  # row 2's top token
    ids[:, 4] = V + 7  # an id the lm_head cannot produce: ignored by both
    ids[:, 5] = 0
    return ids


def ours(d: dict, logits: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, SamplingParams]:
    p = SamplingParams.from_generation_config(d)
    state = PenaltyState(history.tolist(), V)
    x = state.apply(logits, p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
    return process_logits(x, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p), p


def assert_same_distribution(a: torch.Tensor, b: torch.Tensor):
    assert torch.equal(torch.isinf(a), torch.isinf(b)), "different -inf masks"
    torch.testing.assert_close(torch.softmax(a, -1), torch.softmax(b, -1), atol=1e-6, rtol=0)


SAMPLE_CONFIGS = [
    dict(do_sample=True, top_k=0),  # nothing (temperature 1, top_k explicitly off)
    dict(do_sample=True),  # transformers' implicit top_k=50
    dict(do_sample=True, top_k=0, temperature=0.6),
    dict(do_sample=True, top_k=0, temperature=1.7),
    dict(do_sample=True, top_k=5),
    dict(do_sample=True, top_k=1),
    dict(do_sample=True, top_k=500),  # clamped to V
    dict(do_sample=True, top_k=0, top_p=0.8),
    dict(do_sample=True, top_k=0, top_p=0.5),
    dict(do_sample=True, top_k=0, top_p=0.05),
    dict(do_sample=True, top_k=0, min_p=0.1),
    dict(do_sample=True, top_k=0, min_p=0.6),
    dict(do_sample=True, top_k=0, min_p=1.0),
    dict(do_sample=True, top_k=0, repetition_penalty=1.3),
    dict(do_sample=True, top_k=0, repetition_penalty=0.7),
    dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05),  # Qwen2-7B-Instruct
    dict(do_sample=True, temperature=0.5, top_k=8, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    dict(do_sample=True, temperature=1.5, top_p=0.7, min_p=0.2),  # top_k=50 implied
]


@pytest.mark.parametrize("d", SAMPLE_CONFIGS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_warpers_match_transformers(hf, d):
    logits, history = make_logits(), make_history()
    processors, gc = hf_processors(hf, d, history.shape[1])
    expected = processors(history, logits.clone())
    got, params = ours(d, logits, history)
    assert params.temperature == gc.temperature and params.top_k == gc.top_k
    assert_same_distribution(got, expected)
    if 0 < params.top_k < V or params.top_p < 1 or params.min_p > 0:  # the filter did cut something here
        assert got.isinf().sum() > logits.isinf().sum()


@pytest.mark.parametrize("d", [dict(), dict(do_sample=False, repetition_penalty=1.3, temperature=0.7, top_p=0.5),
                               dict(repetition_penalty=0.8)])
def test_greedy_matches_transformers(hf, d):
    logits, history = make_logits(), make_history()
    processors, _ = hf_processors(hf, d, history.shape[1])
    expected = processors(history, logits.clone())
    got, params = ours(d, logits, history)
    assert params.greedy
    torch.testing.assert_close(got, expected, atol=0, rtol=0)  # same arithmetic: bit-identical
    assert torch.equal(sample_next(got, temperature=0.0, generators=None), torch.argmax(expected, -1))


def test_greedy_is_argmax_after_repetition_penalty():
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.5]])
    state = PenaltyState([[0, 0, 2]], 4)
    penalised = state.apply(logits, repetition_penalty=1.2)
    # id 0 divided once (not twice for two occurrences), id 2 multiplied because it is negative
    torch.testing.assert_close(penalised, torch.tensor([[2.0 / 1.2, 1.9, -1.2, 0.5]]))
    assert sample_next(logits, temperature=0.0, generators=None).tolist() == [0]
    assert sample_next(penalised, temperature=0.0, generators=None).tolist() == [1]


def test_boundaries_exact():
    """Four equal tokens (p = 1/4 each, exact in fp32) and the rest masked."""
    x = torch.full((1, 8), -math.inf)
    x[0, :4] = 0.0

    def finite(**kw) -> int:
        kw = {**dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0), **kw}
        return int(torch.isfinite(process_logits(x, **kw)).sum())

    assert finite(top_p=0.5) == 2  # cumulative mass 0.5 <= 1 - 0.5 is dropped: keep the smallest set with mass >= top_p
    assert finite(top_p=0.51) == 3
    assert finite(top_p=0.25) == 1
    tiny = process_logits(make_logits(), temperature=1.0, top_k=0, top_p=1e-9, min_p=0.0)
    assert torch.isfinite(tiny).sum(-1).tolist() == [1] * 6  # the most probable token always stays, even in a tie
    assert finite(top_k=2) == 4  # ties at the k-th value all survive
    assert finite(top_k=100) == 4  # top_k > V is clamped, and -inf entries are never revived
    assert finite(min_p=1.0) == 4  # p < min_p * p_max is strict
    y = torch.tensor([[0.0, -0.1, -5.0]])
    kept = torch.isfinite(process_logits(y, temperature=1.0, top_k=0, top_p=1.0, min_p=0.5))
    assert kept.tolist() == [[True, True, False]]


def test_temperature_zero_and_no_mutation():
    x = make_logits()
    before = x.clone()
    assert process_logits(x, temperature=0.0, top_k=3, top_p=0.1, min_p=0.9) is x
    process_logits(x, temperature=0.7, top_k=3, top_p=0.5, min_p=0.2)
    PenaltyState(make_history().tolist(), V).apply(x, 1.5, 0.5, 0.5)
    assert torch.equal(x, before)
    row = x[:1]
    assert PenaltyState([[1, 2]], V).apply(row, 1.0, 0.0, 0.0) is row  # neutral: no copy


# ----------------------------------------------------------------------------------------------------------------
# Validation


INVALID = [
    ("temperature", -0.1, "finite number >= 0"),
    ("temperature", math.inf, "finite number >= 0"),
    ("temperature", math.nan, "finite number >= 0"),
    ("temperature", "0.7", "finite number >= 0"),
    ("top_k", -1, "integer >= 0"),
    ("top_k", 2.5, "integer >= 0"),
    ("top_k", True, "integer >= 0"),
    ("top_p", 0.0, "(0, 1]"),
    ("top_p", 1.01, "(0, 1]"),
    ("top_p", math.nan, "(0, 1]"),
    ("min_p", -0.01, "[0, 1]"),
    ("min_p", 1.5, "[0, 1]"),
    ("repetition_penalty", 0.0, "> 0"),
    ("repetition_penalty", -1.0, "> 0"),
    ("repetition_penalty", math.inf, "> 0"),
    ("presence_penalty", 2.5, "[-2, 2]"),
    ("presence_penalty", -2.01, "[-2, 2]"),
    ("frequency_penalty", 3.0, "[-2, 2]"),
    ("frequency_penalty", math.nan, "[-2, 2]"),
]
VALID = dict(temperature=0.7, top_k=20, top_p=0.8, min_p=0.0, repetition_penalty=1.05,
             presence_penalty=0.0, frequency_penalty=0.0)


@pytest.mark.parametrize("name,value,allowed", INVALID, ids=[f"{n}={v!r}" for n, v, _ in INVALID])
def test_validation_errors(name, value, allowed):
    for check in (lambda: validate_sampling(**{**VALID, name: value}),
                  lambda: SamplingParams(**{**VALID, name: value}).validate()):
        with pytest.raises(Qwen2PureError) as e:
            check()
        msg = str(e.value)
        assert name in msg and repr(value) in msg and allowed in msg


def test_validation_accepts_boundaries():
    validate_sampling(temperature=0, top_k=0, top_p=1, min_p=0, repetition_penalty=1)
    validate_sampling(temperature=2.0, top_k=1, top_p=1e-9, min_p=1.0, repetition_penalty=1e-3,
                      presence_penalty=-2, frequency_penalty=2.0)
    with pytest.raises(Qwen2PureError, match="top_p"):
        process_logits(make_logits(), temperature=1.0, top_k=0, top_p=0.0, min_p=0.0)
    with pytest.raises(Qwen2PureError, match="seed"):
        SamplingParams(seed=1.5).validate()
    with pytest.raises(Qwen2PureError, match="seed"):
        make_generators("7", 2)


# ----------------------------------------------------------------------------------------------------------------
# Penalties


def test_presence_frequency_are_openai_over_generated_only():
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(3))
    prompts = [[1, 1, 2], [9]]
    generated = [[2, 2, 3, 2], [1, 9, -1, -1]]  # row 1 finished after two tokens
    state = PenaltyState(prompts, 10)
    for step in range(4):
        state.update(torch.tensor([generated[0][step], generated[1][step]]))
    got = state.apply(logits, presence_penalty=0.5, frequency_penalty=0.3)
    expected = logits.clone()
    for b, toks in enumerate(generated):
        for v in range(10):
            count = sum(t == v for t in toks)
            expected[b, v] -= 0.5 * (count > 0) + 0.3 * count
    torch.testing.assert_close(got, expected)
    assert got[0, 1] == logits[0, 1]  # prompt-only id: no presence/frequency penalty
    # negative penalties reward instead
    torch.testing.assert_close(state.apply(logits, presence_penalty=-1.0)[0, 3], logits[0, 3] + 1.0)


def test_penalty_state_over_steps_matches_transformers(hf):
    """Several steps with finished rows: the repetition penalty equals transformers' over prompt + generated."""
    transformers, _ = hf
    proc = transformers.RepetitionPenaltyLogitsProcessor(1.4)
    g = torch.Generator().manual_seed(5)
    prompts = [[3, 3, V + 2, 7], [0], [V - 1, 12, 12, 40]]  # ragged, with an out-of-vocab id
    state = PenaltyState(prompts, V)
    histories = [list(p) for p in prompts]
    finished = [False, False, False]
    for step in range(6):
        logits = torch.randn(3, V, generator=g) * 2
        got = state.apply(logits, repetition_penalty=1.4, frequency_penalty=0.25)
        for b in range(3):
            if finished[b]:
                continue
            ref = proc(torch.tensor([histories[b]]), logits[b : b + 1].clone())
            gen = histories[b][len(prompts[b]):]
            ref -= 0.25 * torch.bincount(torch.tensor(gen, dtype=torch.long), minlength=V).float()
            torch.testing.assert_close(got[b : b + 1], ref)
        tokens = torch.randint(0, V, (3,), generator=g)
        if step == 1:
            tokens[1] = 3  # prompt id of another row: no cross-talk between rows
        if step >= 2:
            finished[2] = True
        tokens = torch.where(torch.tensor(finished), torch.tensor(-1), tokens)
        state.update(tokens)
        for b in range(3):
            if not finished[b]:
                histories[b].append(int(tokens[b]))
    assert int(state.counts[2].sum()) == 2 and int(state.counts[:2].sum()) == 12
    assert not state.in_prompt[0, V - 1] and state.in_prompt[2, V - 1]


def test_penalty_state_shape_errors():
    state = PenaltyState([[1], [2]], 5)
    with pytest.raises(ValueError, match=r"\(2,\)"):
        state.update(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="vocab_size"):
        state.apply(torch.zeros(2, 6), repetition_penalty=1.1)
    empty = PenaltyState([[], []], 5)  # no prompt at all
    torch.testing.assert_close(empty.apply(torch.ones(2, 5), 2.0), torch.ones(2, 5))


# ----------------------------------------------------------------------------------------------------------------
# Drawing


def test_generators_match_transformers_global_rng():
    """Batch 1: our generator seeded with s draws what `generate(do_sample=True)` draws after torch.manual_seed(s)."""
    logits = make_logits()
    for seed in (0, 1, 42, 2**40 + 3):
        gens = make_generators(seed, 1)
        torch.manual_seed(seed)
        for step in range(5):  # the generator's state advances like the global one
            row = logits[step : step + 1]
            theirs = torch.multinomial(torch.nn.functional.softmax(row, dim=-1), num_samples=1).squeeze(1)
            assert torch.equal(sample_next(row, temperature=1.0, generators=gens), theirs)
    torch.manual_seed(7)
    theirs = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(1)
    torch.manual_seed(7)
    assert torch.equal(sample_next(logits, temperature=1.0, generators=None), theirs)  # global RNG, any batch
    assert make_generators(None, 4) is None


def test_seeded_sampling_reproducible_and_batch_invariant():
    logits = torch.zeros(4, 1000)  # uniform: any dependence on the seed or the other rows shows

    def draws(x, gens):  # 20 steps of the same logits: [20, B]
        return torch.stack([sample_next(x, temperature=1.0, generators=gens) for _ in range(20)])

    a = draws(logits, make_generators(11, 4))
    assert torch.equal(a, draws(logits, make_generators(11, 4)))
    assert torch.equal(a[:, 0], draws(logits[:1], make_generators(11, 1))[:, 0])  # row 0 == batch of one
    assert len({tuple(a[:, i].tolist()) for i in range(4)}) == 4  # rows get different streams
    assert not torch.equal(a, draws(logits, make_generators(12, 4)))
    other = logits.clone()
    other[1:] = torch.randn(3, 1000)  # change every other row: row 0 is unaffected
    assert torch.equal(a[:, 0], draws(other, make_generators(11, 4))[:, 0])
    gens = make_generators(11, 3)
    assert gens[0].initial_seed() == 11 and len({g.initial_seed() for g in gens}) == 3
    assert gens[1].initial_seed() != 12  # row 1 of seed 11 is not row 0 of seed 12: requests stay uncorrelated
    with pytest.raises(ValueError, match="generators"):
        sample_next(logits, temperature=1.0, generators=make_generators(1, 2))


def test_sampled_tokens_respect_the_mask():
    x = process_logits(make_logits(), temperature=0.9, top_k=3, top_p=0.9, min_p=0.0)
    gens = make_generators(3, x.shape[0])
    for _ in range(50):
        tok = sample_next(x, temperature=0.9, generators=gens)
        assert torch.isfinite(x.gather(1, tok[:, None])).all()


@pytest.mark.parametrize("d", [
    dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05),
    dict(do_sample=True, temperature=1.3, min_p=0.05, repetition_penalty=1.3),
    dict(do_sample=False, repetition_penalty=1.2),
])
def test_generate_loop_matches_transformers_generate(hf, d):
    """End to end with a tiny random Qwen2: our sampler on its logits reproduces `model.generate` token for token."""
    transformers, model = hf
    model.generation_config = transformers.GenerationConfig(**d, eos_token_id=None, pad_token_id=0)
    prompt = torch.tensor([[5, 17, 17, 60, 2]])
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = model.generate(prompt, max_new_tokens=8, use_cache=False)[0, prompt.shape[1]:]
        p = SamplingParams.from_generation_config(d, seed=seed)
        gens = make_generators(p.seed, 1)
        state = PenaltyState(prompt.tolist(), V)
        ids = prompt
        for _ in range(8):
            with torch.no_grad():
                logits = model(ids).logits[:, -1].float()
            logits = state.apply(logits, p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
            logits = process_logits(logits, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p)
            tok = sample_next(logits, temperature=p.temperature, generators=gens)
            state.update(tok)
            ids = torch.cat([ids, tok[:, None]], dim=1)
        assert ids[0, prompt.shape[1]:].tolist() == theirs.tolist()


# ----------------------------------------------------------------------------------------------------------------
# Parameters from generation_config.json


def test_from_generation_config():
    instruct = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8}
    assert SamplingParams.from_generation_config(instruct) == SamplingParams(
        temperature=0.7, top_k=20, top_p=0.8, min_p=0.0, repetition_penalty=1.05)
    base = {"bos_token_id": 151643, "do_sample": False, "eos_token_id": 151643, "max_new_tokens": 2048}
    assert SamplingParams.from_generation_config(base) == SamplingParams(top_k=50)  # greedy
    assert SamplingParams.from_generation_config({}).greedy
    # do_sample false wins over the file's temperature; the repetition penalty stays (transformers applies it greedily)
    p = SamplingParams.from_generation_config({"do_sample": False, "temperature": 0.7, "repetition_penalty": 1.1})
    assert p.temperature == 0.0 and p.repetition_penalty == 1.1
    # sampling with no top_k in the file: transformers' default 50; null means absent
    assert SamplingParams.from_generation_config({"do_sample": True, "top_k": None}).top_k == 50
    assert SamplingParams.from_generation_config({"do_sample": True, "temperature": 1}).temperature == 1.0
    # overrides: None ignored, others replace, temperature > 0 turns sampling on
    p = SamplingParams.from_generation_config(instruct, temperature=None, top_p=0.95, seed=3, presence_penalty=0.5)
    assert (p.temperature, p.top_p, p.seed, p.presence_penalty) == (0.7, 0.95, 3, 0.5)
    assert SamplingParams.from_generation_config(base, temperature=0.8).temperature == 0.8
    assert SamplingParams.from_generation_config(instruct, temperature=0).greedy
    with pytest.raises(Qwen2PureError, match="temprature"):
        SamplingParams.from_generation_config(instruct, temprature=0.5)
    with pytest.raises(Qwen2PureError, match="top_p=1.5"):
        SamplingParams.from_generation_config({"do_sample": True, "top_p": 1.5})
    with pytest.raises(Qwen2PureError, match="top_k"):
        SamplingParams.from_generation_config({"do_sample": True, "top_k": "20"})
    with pytest.warns(UserWarning, match="typical_p"):
        SamplingParams.from_generation_config({"do_sample": True, "typical_p": 0.9})
    with pytest.raises(Exception):
        p.temperature = 1.0  # frozen
