"""The command line (qwen2_pure/cli.py): `generate`, `chat` (Qwen's cli_demo commands) and `convert`, the
checks of every value before a model loads, and the demo model's sampling defaults in chat, generate and serve.

The model is a tiny random Qwen2 (1 layer, hidden 32) with the real Qwen2.5 tokenizer (151,936 rows), so
prompts, chat templates and decoding are real. About 130 ordinary English words get large embedding rows
(tied with the LM head) and the final norm gets random signs, so that greedy decoding emits varied, readable
words instead of one token repeated. Most tests call `cli.main([...])` or `ChatSession` in-process; a few run
the CLI as a subprocess where process behaviour matters (stdout purity, exit status, no traceback, stdin).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qwen2_pure
from qwen2_pure import cli, generation
from qwen2_pure.cli import HELP, ChatSession, main

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 8  # the checkpoint's generation_config.json max_new_tokens (keeps chat answers short)

SAMPLE = ["--temperature", "1.0", "--top-k", "10"]  # top-k 10 keeps sampling among the loud word tokens


# ---- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(demo_tokenizer_dir, tmp_path_factory):
    """A ~20 MB checkpoint folder: random tiny Qwen2 + the demo's tokenizer files."""
    from hf_utils import make_chat_checkpoint
    return make_chat_checkpoint(tmp_path_factory.mktemp("cli_model"), demo_tokenizer_dir, MAX_NEW)


@pytest.fixture(scope="module")
def short_dir(model_dir, tmp_path_factory):
    """The same checkpoint with a context of 24 tokens (max_position_embeddings)."""
    d = tmp_path_factory.mktemp("cli_model_short")
    for f in model_dir.iterdir():
        if f.suffix == ".safetensors":
            try:
                os.symlink(f, d / f.name)
            except OSError:
                shutil.copy(f, d / f.name)
        else:
            shutil.copy(f, d / f.name)
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = 24
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def loaded(model_dir):
    return qwen2_pure.load_model(model_dir), qwen2_pure.load_tokenizer(model_dir)


# ---- helpers ----------------------------------------------------------------------------------------------

def api_text(model, tok, prompt: str, *, chat=False, system=None, max_new_tokens=MAX_NEW, **sampling) -> str:
    """What the CLI should print, computed with the Python API."""
    if chat:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True)
    [new] = qwen2_pure.generate(model, [tok.encode(prompt)], max_new_tokens=max_new_tokens,
                                stop_token_ids=tok.stop_token_ids, **sampling)
    return tok.decode(new, skip_special_tokens=True)


def run_main(capsys, *argv):
    """main() in-process: (status, stdout, stderr). generate's stdout is the text and one newline; the text
    comes back without it."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    if argv[0] == "generate" and rc == 0:
        assert out.endswith("\n"), repr(out)
        out = out[:-1]
    return rc, out, err


def error_lines(err: str) -> list[str]:
    """stderr without the '[loaded ...]' line and progress bars."""
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[loaded ")]


def run_cli(*argv, stdin: str = "", timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    return subprocess.run([sys.executable, "-m", "qwen2_pure.cli", *map(str, argv)], input=stdin,
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def run_chat(model, tok, lines, seed=1234, system=None):
    """Drive a ChatSession with scripted input lines (an exception instance is raised instead); EOF at the end."""
    script = list(lines)
    out = io.StringIO()

    def input_fn(prompt=""):
        out.write(prompt)
        if not script:
            raise EOFError
        item = script.pop(0)
        if isinstance(item, BaseException):
            raise item
        out.write(item + "\n")  # echo, as a terminal would
        return item

    session = ChatSession(model, tok, seed=seed, system=system, out=out, input_fn=input_fn)
    rc = session.run()
    return rc, out.getvalue(), session


def answers(out: str) -> list[str]:
    return re.findall(r"^Qwen: (.*)$", out, flags=re.M)


# ---- generate ---------------------------------------------------------------------------------------------

def test_model_emits_varied_words(loaded):
    """Guard for the fixture: greedy text is several different words, so equality checks mean something."""
    model, tok = loaded
    text = api_text(model, tok, "Hello")
    assert len(set(text.split())) >= 3, text
    assert api_text(model, tok, "Hello") == text


def test_generate_stdout_is_the_new_text_and_a_newline(model_dir, loaded):
    """Piped or not, stdout ends with one newline (a shell's prompt, a pager, a log start on a new line);
    the text itself is everything before it."""
    model, tok = loaded
    r = run_cli("generate", "--model", model_dir, "--prompt", "Hello", "--max-new-tokens", 6)
    assert r.returncode == 0, r.stderr
    assert r.stdout == api_text(model, tok, "Hello", max_new_tokens=6) + "\n"
    assert r.stdout.strip()
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("extra, kw", [
    ([], {}),  # max_new_tokens from generation_config.json
    (["--chat"], dict(chat=True)),
    (["--chat", "--system", "You are a pirate."], dict(chat=True, system="You are a pirate.")),
], ids=["plain", "chat", "chat-system"])
def test_generate_matches_python_api(capsys, model_dir, loaded, extra, kw):
    model, tok = loaded
    rc, out, err = run_main(capsys, "generate", "--model", model_dir, "--prompt", "Write a poem", *extra)
    assert rc == 0, err
    assert out == api_text(model, tok, "Write a poem", **kw)
    assert len(tok.encode(out)) <= MAX_NEW


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_generate_quantize_matches_python_api(capsys, model_dir, mode):
    quantized = qwen2_pure.load_model(model_dir, quantize=mode)
    tok = qwen2_pure.load_tokenizer(model_dir)
    rc, out, err = run_main(capsys, "generate", "--model", model_dir, "--prompt", "Hello", "--quantize", mode)
    assert rc == 0, err
    assert out == api_text(quantized, tok, "Hello")
    assert f"{mode} weights" in err


def test_generate_chat_applies_template(capsys, model_dir, loaded):
    model, tok = loaded
    _, plain, _ = run_main(capsys, "generate", "--model", model_dir, "--prompt", "Hello")
    _, chat, _ = run_main(capsys, "generate", "--model", model_dir, "--prompt", "Hello", "--chat")
    assert chat == api_text(model, tok, "Hello", chat=True)
    assert chat != plain


def test_generate_prompt_from_stdin(capsys, monkeypatch, model_dir, loaded):
    model, tok = loaded
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello"))
    rc, out, err = run_main(capsys, "generate", "--model", model_dir, "--prompt", "-", "--max-new-tokens", 4)
    assert rc == 0, err
    assert out == api_text(model, tok, "Hello", max_new_tokens=4)


def test_generate_max_new_tokens(capsys, model_dir, loaded):
    model, tok = loaded
    [new] = qwen2_pure.generate(model, [tok.encode("Hello")], max_new_tokens=3, stop_token_ids=tok.stop_token_ids)
    assert len(new) == 3  # no stop token hit: exactly 3 tokens
    rc, out3, _ = run_main(capsys, "generate", "-m", model_dir, "-p", "Hello", "--max-new-tokens", 3)
    assert rc == 0
    assert out3 == tok.decode(new, skip_special_tokens=True)
    _, out6, _ = run_main(capsys, "generate", "-m", model_dir, "-p", "Hello", "--max-new-tokens", 6)
    assert out6.startswith(out3) and len(out6) > len(out3)


def test_generate_seed_reproducible(capsys, model_dir, loaded):
    model, tok = loaded
    args = ("generate", "--model", model_dir, "--prompt", "Hello", *SAMPLE)
    a = run_main(capsys, *args, "--seed", 1)
    b = run_main(capsys, *args, "--seed", 1)
    assert a[0] == b[0] == 0
    assert a[1] == b[1] == api_text(model, tok, "Hello", temperature=1.0, top_k=10, seed=1)
    others = {run_main(capsys, *args, "--seed", s)[1] for s in (2, 3)}
    assert others - {a[1]}, "a different seed should give a different sample"
    # sampling really happens: the seeded samples are not all the greedy text
    assert ({a[1]} | others) - {api_text(model, tok, "Hello")}


def test_generate_stop_string(capsys, model_dir, loaded):
    model, tok = loaded
    full = api_text(model, tok, "Hello")
    # a word whose first occurrence is not at the start, so the truncated text is non-empty
    stop = next(f" {w}" for w in full.split() if full.index(f" {w}") > 0)
    expected = full[:full.index(stop)]
    assert expected and expected != full
    rc, out, err = run_main(capsys, "generate", "-m", model_dir, "-p", "Hello", "--stop", stop)
    assert rc == 0, err
    assert out == expected
    # several --stop: the earliest wins; one that never occurs changes nothing
    rc, out, _ = run_main(capsys, "generate", "-m", model_dir, "-p", "Hello", "--stop", "zzz-never", "--stop", stop)
    assert out == expected
    _, out, _ = run_main(capsys, "generate", "-m", model_dir, "-p", "Hello", "--stop", "zzz-never")
    assert out == full


def test_generate_invalid_sampling_value_subprocess(model_dir):
    r = run_cli("generate", "--model", model_dir, "--prompt", "Hello", "--top-p", "1.5")
    assert r.returncode == 2
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "top_p" in lines[0], r.stderr


@pytest.mark.parametrize("flag, value, name", [
    ("--temperature", "-1", "temperature"), ("--temperature", "nan", "temperature"), ("--top-k", "-1", "top_k"),
    ("--min-p", "2", "min_p"),
    ("--repetition-penalty", "0", "repetition_penalty"), ("--max-new-tokens", "0", "max_new_tokens"),
])
def test_generate_invalid_sampling_values(capsys, model_dir, flag, value, name):
    rc, out, err = run_main(capsys, "generate", "--model", model_dir, "--prompt", "Hello", flag, value)
    assert rc == 2 and out == ""
    lines = error_lines(err)
    assert len(lines) == 1 and name in lines[0], err


def test_generate_missing_model(tmp_path):
    missing = tmp_path / "no-such-model"
    r = run_cli("generate", "--model", missing, "--prompt", "Hello")
    assert r.returncode == 2
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "no such folder or file" in lines[0], r.stderr


def test_generate_prompt_longer_than_context(capsys, short_dir):
    rc, out, err = run_main(capsys, "generate", "--model", short_dir, "--prompt", " the" * 40)
    assert rc == 2 and out == ""
    lines = error_lines(err)
    assert len(lines) == 1 and "context" in lines[0] and "24" in lines[0], err


def test_generate_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate"])  # --prompt is required
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "x", "--top-k", "many"])
    assert e.value.code == 2


# ---- every value checked before the model loads ----------------------------------------------------------

def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.fixture
def adapter_dir(tmp_path):
    """A folder that passes read_adapter_config (the weights are never read: nothing loads)."""
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                       "target_modules": ["q_proj"]}))
    return d


BAD_VALUES = [
    # (command line after the subcommand, the flag the one-line error must name)
    (["generate", "-p", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "-p", "x", "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["generate", "-p", "x", "--temperature", "-1"], "--temperature"),
    (["generate", "-p", "x", "--temperature", "nan"], "--temperature"),
    (["generate", "-p", "x", "--top-p", "0"], "--top-p"),
    (["generate", "-p", "x", "--top-k", "-1"], "--top-k"),
    (["generate", "-p", "x", "--min-p", "2"], "--min-p"),
    (["generate", "-p", "x", "--repetition-penalty", "0"], "--repetition-penalty"),
    (["generate", "-p", "x", "--seed", str(2 ** 64)], "--seed"),
    (["generate", "-p", "x", "--threads", "0"], "--threads"),
    (["generate", "-p", "x", "--dtype", "int3"], "--dtype"),
    (["generate", "-p", "x", "--device", "warp-drive"], "--device"),
    (["generate", "-p", "x", "--device", "cuda" if not torch.cuda.is_available() else f"cuda:{_cuda_count()}"],
     "--device"),
    (["generate", "-p", "x", "--device", "mps"] if not torch.backends.mps.is_available() else
     ["generate", "-p", "x", "--device", "xpu:99"], "--device"),
    (["generate", "-p", "x", "--adapter", "/no/such/adapter"], "--adapter"),
    (["generate", "-p", "x", "--stop", ""], "--stop"),
    (["generate", "-p", "x", "--system", "You are a pirate."], "--system"),
    (["chat", "--seed", str(-2 ** 64)], "--seed"),
    (["chat", "--dtype", "fp8"], "--dtype"),
    (["chat", "--adapter", "/no/such/adapter"], "--adapter"),
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--slots", "0"], "--slots"),
    (["serve", "--max-seq-len", "1"], "--max-seq-len"),
    (["serve", "--max-queue", "-1"], "--max-queue"),
    (["export", "--adapter", "/no/such/adapter", "--output", "out"], "--adapter"),
]


@pytest.mark.parametrize("argv, flag", BAD_VALUES, ids=[" ".join(a[:1] + a[3:] if a[0] == "generate" else a)
                                                         for a, _ in BAD_VALUES])
def test_bad_values_fail_before_loading(capsys, monkeypatch, argv, flag):
    """One line naming the flag, status 2, and no model (not even the demo's files) touched."""
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the values were checked")
    monkeypatch.setattr(cli, "_load", no_loading)
    monkeypatch.setattr(qwen2_pure.loading, "resolve_source", no_loading)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qwen2-pure: error: {flag}"), err


def test_bad_values_pass_the_good_ones(capsys, monkeypatch, adapter_dir):
    """The checks accept what they should: every value here is fine, so the command gets as far as loading."""
    def stop_at_loading(args):
        raise qwen2_pure.Qwen2PureError("loading")
    monkeypatch.setattr(cli, "_load", stop_at_loading)
    for argv in (["generate", "-p", "x", "--max-new-tokens", "1", "--temperature", "0", "--top-p", "1", "--top-k",
                  "0", "--min-p", "0", "--repetition-penalty", "1.05", "--seed", str(2 ** 64 - 1), "--threads", "1",
                  "--dtype", "bf16", "--device", "cpu", "--adapter", adapter_dir, "--stop", "\n\n"],
                 ["generate", "-p", "x", "--chat", "--system", "s", "--seed", str(-2 ** 63), "--dtype", "auto"],
                 ["chat", "--seed", "0", "--device", "cpu:0"]):
        capsys.readouterr()
        assert main([str(a) for a in argv]) == 2
        assert capsys.readouterr().err.strip() == "qwen2-pure: error: loading", argv


def test_serve_port_taken_fails_before_loading(capsys, monkeypatch):
    import socket
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("loaded before the port was checked"))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        capsys.readouterr()
        rc = main(["serve", "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"--port {port}: cannot listen there" in err, err


def test_device_without_cuda_is_one_line_subprocess():
    """The first-hour case: --device cuda on a CPU-only PyTorch, from a real process (no traceback)."""
    device = "cuda" if not torch.cuda.is_available() else f"cuda:{_cuda_count()}"
    r = run_cli("generate", "--device", device, "--prompt", "Hello")
    assert r.returncode == 2 and r.stdout == ""
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwen2-pure: error: --device") and "CUDA" in lines[0], r.stderr


# ---- the demo model's sampling defaults -------------------------------------------------------------------

OFFICIAL = dict(temperature=0.7, top_k=20, top_p=0.8, min_p=0.0, repetition_penalty=1.05)


@pytest.fixture
def fake_demo(monkeypatch, tmp_path, tiny_gguf):
    """The tiny GGUF standing where the demo GGUF lives in an empty cache, as demo_gguf_path returns it."""
    from qwen2_pure.loading import demo
    monkeypatch.setenv("QWEN2_PURE_CACHE", str(tmp_path / "cache"))
    path = demo.cache_dir() / "qwen2.5-coder-0.5b-instruct.gguf"
    path.parent.mkdir()
    shutil.copy(tiny_gguf, path)
    monkeypatch.setattr(demo, "demo_gguf_path", lambda progress=True: path)
    return path


def test_demo_generation_config_is_the_official_one():
    """Qwen's generation_config.json of Qwen2.5-Coder-0.5B-Instruct (cited in loading/demo.py), read as
    transformers reads it: sampling, temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05."""
    from qwen2_pure.loading.demo import GENERATION_CONFIG
    from qwen2_pure.sampling import SamplingParams
    assert GENERATION_CONFIG == {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                                 "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.7,
                                 "top_p": 0.8, "top_k": 20}
    assert SamplingParams.from_generation_config(GENERATION_CONFIG) == SamplingParams(**OFFICIAL)


def _captured_stream(monkeypatch) -> list[dict]:
    """Record the keyword arguments front ends pass to generation.stream_text (which still runs)."""
    calls: list[dict] = []
    real = generation.stream_text

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)
    monkeypatch.setattr(generation, "stream_text", spy)
    return calls


def test_demo_defaults_reach_generate_and_chat(capsys, monkeypatch, fake_demo):
    calls = _captured_stream(monkeypatch)
    rc, out, err = run_main(capsys, "generate", "-p", "the", "--max-new-tokens", 3, "--seed", 1)
    assert rc == 0, err
    assert {k: calls[-1][k] for k in OFFICIAL} == OFFICIAL
    # the flags still win over the defaults
    rc, _, err = run_main(capsys, "generate", "-p", "the", "--max-new-tokens", 3, "--temperature", "0",
                          "--repetition-penalty", "1")
    assert rc == 0, err
    assert calls[-1]["temperature"] == 0 and calls[-1]["repetition_penalty"] == 1
    loaded = qwen2_pure.load()  # the demo, i.e. the file at fake_demo
    assert loaded.source == str(fake_demo)
    rc, out, session = run_chat(loaded.model, loaded.tokenizer, ["Hello", ":conf"])
    assert {k: calls[-1][k] for k in OFFICIAL} == OFFICIAL
    for line in ("temperature = 0.7", "top_k = 20", "top_p = 0.8", "repetition_penalty = 1.05", "do_sample = True"):
        assert line in out, line
    assert "greedy" not in out


def test_demo_defaults_reach_serve(fake_demo):
    pytest.importorskip("fastapi")
    from qwen2_pure.sampling import SamplingParams
    from qwen2_pure.serve.app import create_app
    loaded = qwen2_pure.load()
    app = create_app(loaded.model, loaded.tokenizer, slots=1, max_seq_len=32)
    assert app.state.info.defaults == SamplingParams(**OFFICIAL)


def test_other_ggufs_keep_their_own_generation_config(capsys, monkeypatch, tiny_gguf, fake_demo):
    """Only the demo file gets the demo's defaults: the same bytes elsewhere are a plain GGUF (greedy)."""
    calls = _captured_stream(monkeypatch)
    rc, _, err = run_main(capsys, "generate", "-m", tiny_gguf, "-p", "the", "--max-new-tokens", 2)
    assert rc == 0, err
    assert calls[-1]["temperature"] == 0 and calls[-1]["repetition_penalty"] == 1.0


# ---- chat (in-process) ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [":help", ":h"])
def test_chat_help(loaded, cmd):
    rc, out, s = run_chat(*loaded, [cmd])
    assert rc == 0
    assert HELP in out
    assert not s.history


@pytest.mark.parametrize("cmd", [":exit", ":quit", ":q"])
def test_chat_exit(loaded, cmd):
    rc, out, _ = run_chat(*loaded, [cmd, ":seed"])
    assert rc == 0
    assert "Current random seed" not in out  # nothing after the exit command is read


def test_chat_eof_and_ctrl_c_at_prompt(loaded):
    rc, out, _ = run_chat(*loaded, [])
    assert rc == 0 and out.startswith("Welcome to qwen2-pure chat")
    rc, _, _ = run_chat(*loaded, [KeyboardInterrupt()])
    assert rc == 1  # as cli_demo: Ctrl-C at the prompt exits with status 1


@pytest.mark.parametrize("cmd", [":clear", ":cl"])
def test_chat_clear_keeps_history(loaded, cmd):
    rc, out, s = run_chat(*loaded, ["Hello", cmd, ":his"])
    assert rc == 0
    assert out.count("Welcome to qwen2-pure chat") == 2
    assert "\033[2J" not in out  # not a terminal: no escape codes
    assert len(s.history) == 1 and " History (1) " in out


@pytest.mark.parametrize("cmd", [":clear-history", ":clh"])
def test_chat_clear_history(loaded, cmd):
    rc, out, s = run_chat(*loaded, ["Hello", "How are you?", cmd, cmd])
    assert rc == 0
    assert "[INFO] All 2 history cleared" in out
    assert "[INFO] All 0 history cleared" in out
    assert s.history == []


@pytest.mark.parametrize("cmd", [":history", ":his"])
def test_chat_history(loaded, cmd):
    rc, out, s = run_chat(*loaded, [cmd, "Hello", "How are you?", cmd])
    assert rc == 0
    assert re.search(r"^=+ History \(0\) =+$", out, flags=re.M)
    assert re.search(r"^=+ History \(2\) =+$", out, flags=re.M)
    (q0, a0), (q1, a1) = s.history
    assert (q0, q1) == ("Hello", "How are you?")
    assert answers(out) == [a0, a1]
    listing = out[out.index(" History (2) "):]
    assert f"User[0]: Hello\nQwen[0]: {a0}\nUser[1]: How are you?\nQwen[1]: {a1}\n" in listing
    assert re.search(r"^=+$", listing, flags=re.M)  # closing rule


def test_chat_seed(loaded):
    rc, out, s = run_chat(*loaded, [":seed", ":seed 7", ":seed", ":seed x"])
    assert rc == 0
    assert "[INFO] Current random seed: 1234" in out
    assert "[INFO] Random seed changed to 7" in out
    assert "[INFO] Current random seed: 7" in out
    assert "[WARNING] Fail to change random seed: 'x' is not a valid number" in out
    assert s.seed == 7


def test_chat_conf(loaded):
    rc, out, s = run_chat(*loaded, [":conf"])
    assert f"max_new_tokens = {MAX_NEW}" in out  # generation_config.json's value
    defaults = dict(s.conf)

    rc, out, s = run_chat(*loaded, [":conf temperature=0.5 top_k=3", ":conf"])
    assert "[INFO] Change config: temperature = 0.5" in out
    assert "[INFO] Change config: top_k = 3" in out
    assert s.conf["temperature"] == 0.5 and s.conf["top_k"] == 3 and s.conf["do_sample"] is True
    assert re.search(r"^temperature = 0\.5$", out, flags=re.M)  # the second :conf lists the new values
    assert re.search(r"^top_k = 3$", out, flags=re.M)

    rc, out, s = run_chat(*loaded, [":conf x", ":conf =1", ":conf nucleus=0.9", ":conf top_p=2", ":conf top_p=0.5",
                                    ":reset-conf"])
    assert out.count("[WARNING] format: <key>=<value>") == 2
    assert "[WARNING] Unknown setting 'nucleus'" in out
    warning = next(ln for ln in out.splitlines() if ln.startswith("[WARNING] top_p"))
    assert "top_p=2" in warning and "invalid" in warning
    assert "[INFO] Change config: top_p = 0.5" in out
    assert "[INFO] Reset generation config" in out
    assert s.conf == defaults
    after = out.split("[INFO] Reset generation config\n")[1]
    assert re.search(rf"^max_new_tokens = {MAX_NEW}$", after, flags=re.M)  # the settings are reprinted
    # keys the file does not set are listed with transformers' defaults, and greedy decoding is said plainly
    assert re.search(r"^top_k = 50 \(default\)$", after, flags=re.M)
    assert "(do_sample is off: answers are greedy)" in after


def test_chat_conf_never_evaluates_code(loaded, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    marker = tmp_path / "pwned"
    payloads = [":conf temperature=__import__('os').system('echo pwned')",
                f":conf temperature=__import__('pathlib').Path({str(marker)!r}).touch()",
                ":conf top_k=len('abc')"]
    rc, out, s = run_chat(*loaded, payloads)
    assert rc == 0
    assert calls == [] and not marker.exists()
    assert "[INFO] Change config" not in out
    assert out.count("[WARNING]") >= len(payloads)
    assert s.conf == s.defaults


def test_chat_conf_literals(loaded):
    rc, out, s = run_chat(*loaded, [":conf do_sample=true", ":conf repetition_penalty=1.1", ":conf temperature=0"])
    assert s.conf["repetition_penalty"] == 1.1
    assert s.conf["temperature"] == 0 and s.conf["do_sample"] is False  # temperature 0 = greedy
    assert "[INFO] Change config: do_sample = True" in out
    # a negative temperature is rejected, not taken as "greedy"
    rc, out, s = run_chat(*loaded, [":conf temperature=-1"])
    assert "[WARNING] temperature=" in out and "invalid" in out
    assert s.conf == s.defaults


def test_chat_empty_query(loaded):
    rc, out, s = run_chat(*loaded, ["", "   "])
    assert rc == 0
    assert out.count("[ERROR] Query is empty") == 2
    assert not s.history and "Qwen: " not in out


def test_chat_unknown_command_is_a_query(loaded):
    rc, out, s = run_chat(*loaded, [":foo"])
    assert len(s.history) == 1 and s.history[0][0] == ":foo"
    assert answers(out) == [s.history[0][1]]


def test_chat_history_feeds_the_next_prompt(loaded, monkeypatch):
    model, tok = loaded
    prompts = []
    real = generation.stream_text

    def spy(model, tokenizer, prompt, **kw):
        prompts.append(list(prompt))
        return real(model, tokenizer, prompt, **kw)

    monkeypatch.setattr(generation, "stream_text", spy)
    rc, out, s = run_chat(model, tok, ["What is 2+2?", "And 3+3?"])
    assert rc == 0 and len(prompts) == 2 and len(s.history) == 2
    (q0, a0), (q1, a1) = s.history
    assert a0 and answers(out) == [a0, a1]
    # the first answer is what the Python API gives for the templated first query
    assert a0 == api_text(model, tok, q0, chat=True)
    first, second = tok.decode(prompts[0]), tok.decode(prompts[1])
    assert second.startswith(first)
    assert f"<|im_start|>user\n{q0}<|im_end|>\n<|im_start|>assistant\n{a0}<|im_end|>\n" in second
    assert second.endswith(f"<|im_start|>user\n{q1}<|im_end|>\n<|im_start|>assistant\n")
    assert s.messages("next") == [
        {"role": "user", "content": q0}, {"role": "assistant", "content": a0},
        {"role": "user", "content": q1}, {"role": "assistant", "content": a1},
        {"role": "user", "content": "next"}]


def test_chat_system_message(loaded):
    model, tok = loaded
    _, _, s = run_chat(model, tok, ["Hello"], system="You are a pirate.")
    assert s.history[0][1] == api_text(model, tok, "Hello", chat=True, system="You are a pirate.")
    assert s.messages("x")[0] == {"role": "system", "content": "You are a pirate."}


def test_chat_seed_reproducible(loaded):
    model, tok = loaded
    q = "Tell me a story"
    rc, out, s = run_chat(model, tok, [":conf temperature=1.0 top_k=10", q, ":clh", q, ":clh",
                                       ":seed 1", q, ":clh", ":seed 2", q, ":clh", ":seed 1234", q])
    a = answers(out)
    assert len(a) == 5
    assert a[0] == a[1] == a[4]  # the seed is reset before every answer
    assert a[0] == api_text(model, tok, q, chat=True, temperature=1.0, top_k=10, seed=1234)
    assert {a[2], a[3]} - {a[0]}, "other seeds should give other answers"


def test_chat_ctrl_c_interrupts_the_answer(loaded, monkeypatch):
    model, tok = loaded
    _, _, fresh = run_chat(model, tok, ["Hello"])
    expected = fresh.history[0][1]

    calls = {"n": 0}
    real_forward = model.forward

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # prefill + 2 decode steps run: 3 tokens are out when Ctrl-C arrives
            raise KeyboardInterrupt
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    rc, out, s = run_chat(model, tok, ["Hello", ":his", "Hello"])
    assert rc == 0
    assert "[WARNING] Generation interrupted" in out
    partial = out.split("Qwen: ", 1)[1].split("\n[WARNING] Generation interrupted", 1)[0]
    assert partial and expected.startswith(partial) and partial != expected
    assert " History (0) " in out  # the interrupted turn was not saved
    assert s.history == [("Hello", expected)]  # and the next query is answered as if it never happened
    assert answers(out)[-1] == expected


def test_chat_conversation_longer_than_context(short_dir):
    model, tok = qwen2_pure.load_model(short_dir), qwen2_pure.load_tokenizer(short_dir)
    rc, out, s = run_chat(model, tok, ["the " * 40, ":seed"])
    assert rc == 0
    assert "[ERROR] The conversation" in out and "context of 24 tokens" in out
    assert "[INFO] Current random seed: 1234" in out  # the session goes on
    assert not s.history


# ---- chat (subprocess, stdin piped) -----------------------------------------------------------------------

def test_chat_subprocess(model_dir, loaded):
    model, tok = loaded
    _, _, ref = run_chat(model, tok, ["Hello", ":foo"])
    (_, a_hello), (_, a_foo) = ref.history
    script = [
        ":h", ":help", ":seed", ":seed 7", ":seed x", ":seed 1234",
        ":conf", ":conf temperature=0.5 top_k=3", ":conf x",
        ":conf temperature=__import__('os').system('echo pwned')", ":conf top_p=2", ":reset-conf",
        "", "Hello", ":foo", ":his", ":history", ":clh", ":clear-history", ":cl", ":clear",
    ]  # then EOF
    r = run_cli("chat", "--model", model_dir, stdin="\n".join(script) + "\n")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    out = r.stdout
    assert out.count(HELP) == 2
    for msg in ["[INFO] Current random seed: 1234", "[INFO] Random seed changed to 7",
                "[WARNING] Fail to change random seed: 'x' is not a valid number",
                "[INFO] Random seed changed to 1234", f"max_new_tokens = {MAX_NEW}",
                "[INFO] Change config: temperature = 0.5", "[INFO] Change config: top_k = 3",
                "[WARNING] format: <key>=<value>", "[INFO] Reset generation config", "[ERROR] Query is empty",
                f"Qwen: {a_hello}\n", f"Qwen: {a_foo}\n", f"User[0]: Hello\nQwen[0]: {a_hello}\n",
                "User[1]: :foo\n", "[INFO] All 2 history cleared", "[INFO] All 0 history cleared"]:
        assert msg in out, msg
    assert "pwned" not in out.replace("'echo pwned'", "").replace("echo pwned", "")
    assert not re.search(r"^pwned$", out, flags=re.M)
    assert "[WARNING] top_p=2" in out  # piped stdin: the message follows the "User> " prompt on its line
    assert out.count("User> ") == len(script) + 1  # one prompt per line, plus the one that hit EOF
    assert out.count("Welcome to qwen2-pure chat") == 3
    assert out.count(" History (2) ") == 2


# ---- convert ----------------------------------------------------------------------------------------------

def test_convert(capsys, tiny_gguf, tmp_path):
    out_dir = tmp_path / "converted"
    rc, out, err = run_main(capsys, "convert", tiny_gguf, out_dir)
    assert rc == 0, err
    assert out == ""
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out_dir / name).is_file(), name
    # the folder is a model the CLI runs, and gives the same text as the GGUF it came from
    rc, from_dir, err = run_main(capsys, "generate", "-m", out_dir, "-p", "the", "--max-new-tokens", 4)
    assert rc == 0, err
    rc, from_gguf, err = run_main(capsys, "generate", "-m", tiny_gguf, "-p", "the", "--max-new-tokens", 4)
    assert rc == 0, err
    assert from_dir == from_gguf


def test_convert_into_nonempty_folder(capsys, tiny_gguf, tmp_path):
    out_dir = tmp_path / "taken"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    rc, out, err = run_main(capsys, "convert", tiny_gguf, out_dir)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(out_dir) in lines[0] and "not empty" in lines[0], err
    assert "--overwrite" in lines[0]  # the CLI's flag, not the Python keyword
    assert (out_dir / "keep.txt").read_text() == "mine" and len(list(out_dir.iterdir())) == 1
    rc, _, err = run_main(capsys, "convert", tiny_gguf, out_dir, "--overwrite")
    assert rc == 0, err
    assert (out_dir / "config.json").is_file()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_convert_dtype(capsys, tiny_gguf, tmp_path, dtype):
    """--dtype writes that dtype (and says so in config.json): the fp32 conversion's values, rounded."""
    from qwen2_pure.loading.safetensors_io import SafetensorsFile
    ref, out_dir = tmp_path / "fp32", tmp_path / dtype
    assert run_main(capsys, "convert", tiny_gguf, ref)[0] == 0
    rc, out, err = run_main(capsys, "convert", tiny_gguf, out_dir, "--dtype", dtype)
    assert rc == 0, err
    assert json.loads((out_dir / "config.json").read_text())["torch_dtype"] == dtype
    assert json.loads((ref / "config.json").read_text())["torch_dtype"] == "float32"
    want = getattr(torch, dtype)
    with SafetensorsFile(ref / "model.safetensors") as a, SafetensorsFile(out_dir / "model.safetensors") as b:
        assert a.names() == b.names()
        for name in a.names():
            assert b.get(name).dtype == want
            assert torch.equal(b.get(name), a.get(name).to(want)), name
    assert (out_dir / "model.safetensors").stat().st_size < 0.6 * (ref / "model.safetensors").stat().st_size
    rc, text, err = run_main(capsys, "generate", "-m", out_dir, "-p", "the", "--max-new-tokens", 3)
    assert rc == 0, err
    with pytest.raises(SystemExit):  # argparse's own choices
        main(["convert", str(tiny_gguf), str(tmp_path / "x"), "--dtype", "int8"])


def test_convert_missing_input(capsys, tmp_path):
    rc, out, err = run_main(capsys, "convert", tmp_path / "nope.gguf", tmp_path / "out")
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "nope.gguf" in err
    assert not (tmp_path / "out").exists()


def test_cli_module_help_lists_commands():
    help_text = cli.build_parser().format_help()
    for cmd in ("generate", "chat", "convert"):
        assert cmd in help_text


def test_generate_tiny_temperature_is_greedy(capsys, model_dir, loaded):
    """--temperature 1e-40 used to overflow the sampler (a raw traceback); below 1e-5 is greedy (vLLM's rule)."""
    model, tok = loaded
    rc, out, err = run_main(capsys, "generate", "--model", model_dir, "--prompt", "Hello", "--temperature", "1e-40")
    assert rc == 0, err
    assert out == api_text(model, tok, "Hello")
    assert "Traceback" not in err and error_lines(err) == [], err
