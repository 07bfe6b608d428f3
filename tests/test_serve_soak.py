"""benchmarks/serve_soak.py, short: 8 clients for 12 s (after a 3 s warm-up) on its tiny random model, with every
invariant of the full soak: each good answer equals `qwen2_pure.generate` alone, malformed requests get their
4xx, abandoned ones free their rows; afterwards the engine is idle with every cache row and slot free, no file
descriptor or thread is left behind, RSS is within the bound, /health and one more request answer. A soak whose
expected answer is wrong must fail (the comparison is real)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("transformers")
import serve_soak  # noqa: E402


@pytest.fixture(scope="module")
def tiny(demo_tokenizer_dir, tmp_path_factory):
    return serve_soak.tiny_checkpoint(tmp_path_factory.mktemp("soak_model"), demo_tokenizer_dir)


def test_short_soak(tiny, tmp_path):
    logs = []
    r = serve_soak.run(str(tiny), seconds=12, clients=8, warmup=3, log=logs.append)
    assert r["passed"], "\n".join(r["failures"] + logs)
    assert r["errors"] == 0 and r["requests"] > 50
    counts = r["requests_by_kind"]
    for kind in ("chat_stream", "chat", "completion_stream", "sampled", "malformed", "disconnect"):
        assert counts.get(kind, 0) > 0, counts
    for kind in ("tools", "json_schema"):  # run, or skipped because the server refuses them (a 4xx)
        assert counts.get(kind, 0) > 0 or r["skipped_kinds"][kind].startswith("HTTP 4"), r["skipped_kinds"]
    after = r["engine_after"]
    assert after["rows"] == 0 and after["t"] == 0 and after["mask_sum"] == 0 and after["final_request"] == "ok"
    assert after["load"]["running"] == 0 and after["load"]["waiting"] == 0 and after["health"][0] == 200
    assert r["after"]["fds"] <= r["before"]["fds"] and r["after"]["threads"] <= r["before"]["threads"]
    assert r["rss_growth_mb"] <= r["config"]["rss_bound_mb"] + r["after"]["prefix_pool_mb"]
    assert r["engine_stats"]["max_batch"] >= 4 and r["engine_stats"]["prefix_hits"] > 0  # batched, cache used
    # the prompts' expected answers differ (a tiny random model repeats itself within an answer, but each prompt
    # leads elsewhere), so that equality with generate alone means something
    texts = [g.text for g in serve_soak.good_requests(*_loaded(tiny))]
    assert len(set(texts)) >= 8 and len({t.split()[0] for t in texts if t.split()}) >= 4, texts
    # the report: JSON and Markdown
    json.dumps(r)
    text = serve_soak.markdown(r, "python benchmarks/serve_soak.py --seconds 12 --clients 8")
    assert "**passed**" in text and "| chat_stream |" in text


def _loaded(path):
    import qwen2_pure
    loaded = qwen2_pure.load(path)
    return loaded.model, loaded.tokenizer


def test_soak_catches_a_wrong_answer(tiny, monkeypatch):
    real = serve_soak.good_requests

    def wrong(model, tok):
        goods = real(model, tok)
        for g in goods:
            g.text += " (not what generate says)"
        return goods

    monkeypatch.setattr(serve_soak, "good_requests", wrong)
    monkeypatch.setattr(serve_soak, "KINDS", {"chat_stream": 1, "malformed": 1})
    r = serve_soak.run(str(tiny), seconds=1, clients=2, warmup=0, log=lambda m: None)
    assert not r["passed"] and r["errors_by_kind"].get("chat_stream", 0) > 0
    assert any("not what generate says" in f for f in r["failures"])
