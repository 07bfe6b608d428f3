"""`qwen2-pure`: generate, chat and convert from the command line.

    qwen2-pure chat                                   # the demo model (Qwen2.5-Coder-0.5B-Instruct), on the CPU
    qwen2-pure generate --model DIR_OR_GGUF_OR_ID --prompt "..." [--chat] [--max-new-tokens N] [--seed S]
    qwen2-pure convert FILE.gguf OUT_DIR [--dtype float32|bfloat16|float16]
    qwen2-pure export --model SRC --adapter LORA_DIR --output OUT_DIR [--dtype bf16]   # merge a LoRA adapter
    qwen2-pure inspect Qwen2-7B [--compare Qwen1.5-7B] [--json] [--plot F.png] [--tree]
    qwen2-pure serve [--model SRC] [--port 8000] [--api-key KEY]   # OpenAI-compatible API + web chat
    qwen2-pure train --stage sft --finetuning_type lora --model_name_or_path SRC ...   # LLaMA-Factory's flags
    qwen2-pure export --model SRC --adapter DIR --output OUT                         # merge a LoRA adapter

Argument parsing and terminal I/O only; the work is done by the modules it calls. Every value on the
command line is checked before a model is loaded (`check_values`), and a user error prints one line on
stderr naming the flag (no traceback) and exits with status 2, as argparse's own errors do.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import sys
import time
import warnings
from typing import Callable, Optional

from .errors import Qwen2PureError

SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens")
DEFAULT_MAX_NEW_TOKENS = 2048  # as Qwen's cli_demo sets


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="model folder, .gguf file or modelscope id (default: the embedded demo model)")
    p.add_argument("--dtype", default="auto", help="auto (config.json's), float32, bfloat16 or float16")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: one per core)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantization of the linear layers while loading (activations keep --dtype)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (torch.compile on CPU, a CUDA graph on CUDA); the first "
                        "answer pays the compilation")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the model's generation_config.json)")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None, help="0 = off")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")


def _add_speculative_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (while one answer runs; greedy answers stay the same, sampled "
                             "ones follow the same distribution)")
    g.add_argument("--prompt-lookup", type=int, default=None, metavar="N",
                   help="guess up to N tokens a step by copying what followed the last two tokens earlier in the "
                        "text; the model checks them in one forward (fast when the answer repeats the prompt, as "
                        "code edits do)")
    g.add_argument("--draft-model", default=None, metavar="SRC",
                   help="a smaller model of the same tokenizer (folder, .gguf, modelscope id, or 'demo') that "
                        "guesses tokens for the model to check; loaded with the same --dtype, --device, --quantize")
    g.add_argument("--draft-tokens", type=int, default=5, metavar="N",
                   help="tokens --draft-model guesses a step (default 5)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2-pure", description="Qwen2 / Qwen2.5 in plain PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete a prompt and print only the new text")
    _add_model_args(gen)
    gen.add_argument("--prompt", "-p", required=True, help="the prompt ('-' reads it from stdin)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--adapter", default=None, metavar="DIR", help="a peft LoRA adapter folder to apply")
    _add_sampling_args(gen)
    _add_speculative_args(gen)

    chat = sub.add_parser("chat", help="interactive chat, like Qwen2's cli_demo")
    _add_model_args(chat)
    _add_speculative_args(chat)
    chat.add_argument("--seed", "-s", type=int, default=1234, help="random seed, reset before every answer")
    chat.add_argument("--system", default=None, help="system message (default: the template's own)")
    chat.add_argument("--adapter", default=None, metavar="DIR", help="a peft LoRA adapter folder to apply")

    tr = sub.add_parser("train", add_help=False,
                        help="LoRA SFT with LLaMA-Factory's flags (qwen2-pure train --stage sft ... ; --help lists them)")
    tr.add_argument("train_args", nargs=argparse.REMAINDER)

    exp = sub.add_parser("export", help="merge a LoRA adapter into its base and write an HF-layout folder")
    exp.add_argument("--model", "-m", default=None,
                     help="base model folder, .gguf file or modelscope id (default: the embedded demo model)")
    exp.add_argument("--adapter", required=True, metavar="DIR", help="the peft LoRA adapter folder")
    exp.add_argument("--output", "-o", required=True, metavar="DIR", help="output folder (must not exist or be empty)")
    exp.add_argument("--dtype", default="auto", help="auto (config.json's), float32, bfloat16 or float16")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    conv = sub.add_parser("convert", help="convert a .gguf file to a Hugging Face-layout folder")
    conv.add_argument("gguf", help="input .gguf file")
    conv.add_argument("out_dir", help="output folder (created; must not exist or be empty)")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                      help="weight dtype of model.safetensors. float32 (default) holds the dequantized GGUF values "
                           "exactly. bfloat16 and float16 halve the size but round them (GGUF blocks are f16 scales "
                           "times small integers, which neither type holds in general): on the demo model 79%% of "
                           "the weights change in bfloat16 (relative error up to 2^-8), 47%% in float16 (up to "
                           "2^-11; values below 6e-5 lose more)")

    insp = sub.add_parser("inspect", help="parameters, FLOPs, weight and KV-cache bytes of a model (reads no weights)")
    insp.add_argument("source", nargs="?", default=None,
                      help="a preset named as the official repository (Qwen2-7B, Qwen/Qwen2.5-0.5B-Instruct, ...; "
                           "see --list), a checkpoint folder or a config.json")
    insp.add_argument("--compare", nargs="+", metavar="MODEL", default=None,
                      help="side by side: `inspect A --compare B` or `inspect --compare A B`")
    insp.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    insp.add_argument("--plot", metavar="FILE.png", default=None,
                      help="also write a PNG: parameter breakdown, KV-cache bytes vs context (needs matplotlib)")
    insp.add_argument("--tree", action="store_true", help="also print the module tree (built on the meta device)")
    insp.add_argument("--context", type=int, default=None,
                      help="context length T for FLOPs and KV bytes (default: max_position_embeddings)")
    insp.add_argument("--dtype", default="bf16", help="KV-cache dtype: fp32, bf16, fp16 or int8 (default bf16)")
    insp.add_argument("--list", action="store_true", help="list the built-in presets and exit")

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page (needs the serve extra)")
    _add_model_args(srv)
    _add_speculative_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    srv.add_argument("--api-key", default=os.environ.get("QWEN2_PURE_API_KEY"),
                     help="require 'Authorization: Bearer KEY' on /v1 (default: $QWEN2_PURE_API_KEY, else none)")
    srv.add_argument("--served-model-name", default=None,
                     help="the model id clients send (default: the checkpoint's folder or file name)")
    srv.add_argument("--slots", type=int, default=16, help="requests decoded together in one batch (default 16)")
    srv.add_argument("--max-seq-len", type=int, default=None,
                     help="prompt + answer tokens per request, i.e. KV-cache slots per row "
                          "(default: the model's context, at most 4096)")
    srv.add_argument("--max-queue", type=int, default=64,
                     help="requests that may wait for a free slot; beyond that the server answers 429 (default 64)")
    srv.add_argument("--prompt-cache-mb", type=int, default=512,
                     help="keys/values of recently finished requests kept to skip recomputing a shared prefix "
                          "(a system prompt, a chat's history); 0 turns it off (default 512)")
    srv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


# ---- every value checked before anything is loaded ----------------------------------------------------------
# Loading the demo model takes 15-20 s on a small CPU, a large model minutes: a typo must fail at once. The
# rules are the library's own (validate_sampling, parse_dtype, read_adapter_config, the engine's bounds).

_SAMPLING_FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
                   "repetition_penalty": "--repetition-penalty"}


def _flag(flag: str, check: Callable[[], object]):
    """Run `check`; a Qwen2PureError it raises comes back with the command-line flag in front."""
    try:
        return check()
    except Qwen2PureError as e:
        raise Qwen2PureError(f"{flag}: {e}") from None


def check_max_new_tokens(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise Qwen2PureError(f"max_new_tokens={value!r} is invalid: it must be an integer >= 1")
    return value


def check_seed(seed) -> int:
    """A seed torch.Generator takes (torch raises an OverflowError-like ValueError past 64 bits)."""
    import torch
    try:
        torch.Generator().manual_seed(seed)
    except (ValueError, RuntimeError, TypeError):
        raise Qwen2PureError(f"seed={seed!r} is invalid: it must be an integer in [-2**63, 2**64)") from None
    return seed


def check_device(device: str):
    """The torch.device `device` names, if this machine has it; else a Qwen2PureError that says why.

    Without this, a CPU-only PyTorch fails deep in the first copy to CUDA with an AssertionError
    ("Torch not compiled with CUDA enabled"), after the weights were read.
    """
    import torch
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise Qwen2PureError(f"device={device!r} is not a device name (cpu, cuda, cuda:N or mps)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda or getattr(torch.version, "hip", None)
            why = "no CUDA device is visible (driver? CUDA_VISIBLE_DEVICES?)" if built else \
                f"this PyTorch ({torch.__version__}) was built without CUDA"
            raise Qwen2PureError(f"device={device!r}: CUDA is not available: {why}")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise Qwen2PureError(f"device={device!r}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise Qwen2PureError(f"device={device!r}: MPS (Apple GPU) is not available on this machine")
    elif d.type != "cpu":
        raise Qwen2PureError(f"device={device!r}: qwen2-pure runs on cpu, cuda or mps")
    return d


def _check_listen(host: str, port: int) -> None:
    """Bind (host, port) once and let go, so a taken port fails now and not after the model's load."""
    import socket
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((host, port), family=family):
            pass
    except OSError as e:
        # create_server's own text repeats the address; a lookup error (gaierror) has its own errno space
        why = os.strerror(e.errno) if e.errno and not isinstance(e, socket.gaierror) else (e.strerror or str(e))
        raise Qwen2PureError(f"--host {host} --port {port}: cannot listen there ({why})") from None


def _at_least(flag: str, value: Optional[int], low: int) -> None:
    if value is not None and value < low:
        raise Qwen2PureError(f"{flag}: {flag[2:].replace('-', '_')}={value} is invalid: it must be an integer >= {low}")


def check_values(args) -> None:
    """Check every value of the command line; raise a Qwen2PureError naming the flag at fault."""
    cmd = args.command
    _at_least("--threads", getattr(args, "threads", None), 1)
    if cmd in ("generate", "chat", "serve"):
        _at_least("--prompt-lookup", args.prompt_lookup, 1)
        _at_least("--draft-tokens", args.draft_tokens, 1)
        if args.prompt_lookup is not None and args.draft_model is not None:
            raise Qwen2PureError("--prompt-lookup and --draft-model are two ways of guessing tokens: give one")
    if getattr(args, "device", None) is not None:
        _flag("--device", lambda: check_device(args.device))
    if cmd in ("generate", "chat", "serve", "export"):
        from .loading import parse_dtype
        _flag("--dtype", lambda: parse_dtype(args.dtype))
    if getattr(args, "seed", None) is not None:
        _flag("--seed", lambda: check_seed(args.seed))
    if getattr(args, "adapter", None) is not None:
        from .lora import read_adapter_config
        _flag("--adapter", lambda: read_adapter_config(args.adapter))
    if cmd == "generate":
        from .sampling import SamplingParams
        for name, flag in _SAMPLING_FLAGS.items():  # each value alone, the others neutral
            if getattr(args, name) is not None:
                _flag(flag, lambda: SamplingParams(**{name: getattr(args, name)}).validate())
        if args.max_new_tokens is not None:
            _flag("--max-new-tokens", lambda: check_max_new_tokens(args.max_new_tokens))
        if "" in args.stop:
            raise Qwen2PureError("--stop: an empty stop string would end every answer before it starts")
        if args.system is not None and not args.chat:
            raise Qwen2PureError("--system: a system message needs --chat (the chat template places it)")
    if cmd == "serve":
        if not 0 <= args.port <= 65535:
            raise Qwen2PureError(f"--port: port={args.port} is invalid: it must be in 0..65535")
        for flag, value, low in (("--slots", args.slots, 1), ("--max-seq-len", args.max_seq_len, 2),
                                 ("--max-queue", args.max_queue, 0)):  # the engine's bounds
            _at_least(flag, value, low)
        _check_listen(args.host, args.port)


def _load(args):
    import torch

    from .loading import load
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    # the environment's QWEN2_PURE_* settings are the defaults; --compile turns compilation on
    loaded = load(args.model, dtype=args.dtype, device=args.device, adapter=getattr(args, "adapter", None),
                  quantize=getattr(args, "quantize", None), compile=True if getattr(args, "compile", False) else None)
    quant = f", {loaded.quantization} weights" if loaded.quantization else ""
    print(f"[loaded {loaded.source} ({str(loaded.model.dtype).replace('torch.', '')}{quant}) in "
          f"{time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
    args.loaded = loaded
    return loaded.model, loaded.tokenizer


def _speculation(args, tokenizer) -> dict:
    """stream_text's speculative arguments for --prompt-lookup / --draft-model (the draft is loaded here, like
    the model, and must encode text as the model's tokenizer does)."""
    from .speculative import DraftModel
    if args.prompt_lookup is not None:
        return {"prompt_lookup_num_tokens": args.prompt_lookup}
    if args.draft_model is None:
        return {}
    from .loading import load
    t0 = time.perf_counter()
    draft = load(args.draft_model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    probe = "def main():\n    print('h\u00e9llo, \u4e16\u754c')  # 0.5 + 1e-3<|im_end|>"
    if draft.tokenizer.encode(probe) != tokenizer.encode(probe):
        raise Qwen2PureError(f"--draft-model {args.draft_model}: its tokenizer encodes text differently from the "
                             "model's; a draft model must share the model's tokenizer")
    print(f"[loaded draft {draft.source} in {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
    return {"assistant_model": DraftModel(draft.model, args.draft_tokens)}


def _settings(model, overrides: dict) -> dict:
    """The generation settings: generation_config.json's sampling keys, then the user's overrides."""
    conf = {k: v for k, v in model.generation_config.raw.items() if k in SAMPLING_KEYS}
    conf.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    conf.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("temperature") is not None:  # asking for a temperature means asking to sample
        # != 0, not > 0: a negative or NaN temperature must reach validation, not silently mean greedy
        conf["do_sample"] = overrides["temperature"] != 0
    return conf


def _sampling_kwargs(conf: dict, seed: Optional[int]) -> dict:
    from .sampling import SamplingParams
    p = SamplingParams.from_generation_config({k: v for k, v in conf.items() if k != "max_new_tokens"})
    max_new = check_max_new_tokens(conf.get("max_new_tokens"))
    return dict(max_new_tokens=max_new, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                repetition_penalty=p.repetition_penalty, seed=seed)


def cmd_generate(args) -> int:
    from .generation import stream_text
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tok = _load(args)
    conf = _settings(model, dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                 repetition_penalty=args.repetition_penalty))
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = tok.encode(prompt)
    for piece in stream_text(model, tok, ids, stop=args.stop, **_speculation(args, tok),
                             **_sampling_kwargs(conf, args.seed)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    # then one newline, as print() and llama.cpp's llama-cli end: the shell's prompt starts on its own line
    # (in a terminal, a pager or a log), and a program drops the last character to get the exact text
    sys.stdout.write("\n")
    return 0


def cmd_convert(args) -> int:
    from pathlib import Path

    from .loading.gguf import convert_gguf
    target = Path(args.out_dir)
    if target.is_dir() and any(target.iterdir()) and not args.overwrite:  # say --overwrite, not overwrite=True
        raise Qwen2PureError(f"{target}: output folder exists and is not empty; pass --overwrite to replace it")
    from .loading.demo import generation_config_for  # the demo GGUF: Qwen's published sampling defaults
    out = convert_gguf(args.gguf, args.out_dir, overwrite=args.overwrite, dtype=args.dtype,
                       generation_config=generation_config_for(args.gguf))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from .loading.export import export_merged
    out = export_merged(args.model, args.adapter, args.output, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}", file=sys.stderr)
    return 0


# ---- chat ----------------------------------------------------------------------------------------------

HELP = """\
Commands:
    :help / :h              Show this help message
    :exit / :quit / :q      Exit the demo
    :clear / :cl            Clear the screen
    :clear-history / :clh   Clear the conversation history
    :history / :his         Show the conversation history
    :seed                   Show the current random seed
    :seed <N>               Set the random seed to <N>
    :conf                   Show the generation settings
    :conf <key>=<value>     Change a setting (keys: {keys})
    :reset-conf             Restore the model's generation settings
Ctrl-C while the model answers stops the answer and keeps the conversation.""".format(keys=", ".join(SAMPLING_KEYS))

COMMANDS = {
    "help": "help", "h": "help", "exit": "exit", "quit": "exit", "q": "exit", "clear": "clear", "cl": "clear",
    "clear-history": "clear-history", "clh": "clear-history", "history": "history", "his": "history",
    "seed": "seed", "conf": "conf", "reset-conf": "reset-conf",
}


def parse_conf_value(text: str):
    """A setting's value as a Python literal (number, bool, None, string) — never evaluated as code."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        raise


class ChatSession:
    """Qwen2 cli_demo's loop and commands, reading lines from `input_fn` and writing to `out`."""

    def __init__(self, model, tokenizer, seed: int = 1234, system: Optional[str] = None, out=None, input_fn=input,
                 name: str = "qwen2", speculation: Optional[dict] = None):
        self.model, self.tok, self.seed, self.system, self.name = model, tokenizer, seed, system, name
        self.out = out or sys.stdout
        self.input = input_fn
        self.defaults = _settings(model, {})
        self.conf = dict(self.defaults)
        self.history: list[tuple[str, str]] = []
        self.speculation = speculation or {}  # stream_text's speculative arguments (--prompt-lookup, --draft-model)
        from .prompt_cache import PromptCache
        # the keys/values of the conversation so far: each turn prefills only what is new since the last one
        self.prompt_cache = PromptCache()

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def welcome(self) -> None:
        self.say(f"Welcome to qwen2-pure chat with {self.name}. "
                 "Type to chat, :h for help, :q to quit.")

    def run(self) -> int:
        self.welcome()
        while True:
            try:
                line = self.input("\nUser> ")
            except EOFError:
                self.say()
                return 0
            except KeyboardInterrupt:
                self.say()
                return 1
            query = line.strip()
            if not query:
                self.say("[ERROR] Query is empty")
                continue
            if query.startswith(":"):
                name, _, rest = query[1:].partition(" ")
                if name in COMMANDS:
                    if self.command(COMMANDS[name], rest.split()) == "exit":
                        return 0
                    continue
            self.answer(query)

    def command(self, cmd: str, args: list[str]):
        if cmd == "exit":
            return "exit"
        if cmd == "help":
            self.say(HELP)
        elif cmd == "clear":
            if self.out.isatty():
                self.out.write("\033[2J\033[H")
            self.welcome()
        elif cmd == "clear-history":
            self.say(f"[INFO] All {len(self.history)} history cleared")
            self.history.clear()
            self.prompt_cache = type(self.prompt_cache)()
        elif cmd == "history":
            width = shutil.get_terminal_size((80, 20)).columns
            self.say(f" History ({len(self.history)}) ".center(width, "="))
            for i, (q, a) in enumerate(self.history):
                self.say(f"User[{i}]: {q}")
                self.say(f"Qwen[{i}]: {a}")
            self.say("=" * width)
        elif cmd == "seed":
            if not args:
                self.say(f"[INFO] Current random seed: {self.seed}")
            else:
                try:
                    self.seed = int(args[0])
                    self.say(f"[INFO] Random seed changed to {self.seed}")
                except ValueError:
                    self.say(f"[WARNING] Fail to change random seed: {args[0]!r} is not a valid number")
        elif cmd == "conf":
            if not args:
                from .sampling import _HF_DEFAULTS
                for k in SAMPLING_KEYS:
                    if k in self.conf:
                        self.say(f"{k} = {self.conf[k]!r}")
                    elif k in _HF_DEFAULTS:
                        self.say(f"{k} = {_HF_DEFAULTS[k]!r} (default)")
                if not _sampling_kwargs(self.conf, self.seed)["temperature"]:
                    self.say("(do_sample is off: answers are greedy)")
            for item in args:
                self.set_conf(item)
        elif cmd == "reset-conf":
            self.conf = dict(self.defaults)
            self.say("[INFO] Reset generation config")
            self.command("conf", [])

    def set_conf(self, item: str) -> None:
        key, eq, value = item.partition("=")
        if not eq or not key:
            self.say("[WARNING] format: <key>=<value>")
            return
        if key not in SAMPLING_KEYS:
            self.say(f"[WARNING] Unknown setting {key!r}; known: {', '.join(SAMPLING_KEYS)}")
            return
        try:
            parsed = parse_conf_value(value)
        except (ValueError, SyntaxError):
            self.say(f"[WARNING] {key}: {value!r} is not a number, boolean or quoted string")
            return
        trial = {**self.conf, key: parsed}
        if key == "temperature" and isinstance(parsed, (int, float)):
            trial["do_sample"] = parsed != 0  # a negative value is then rejected by validation
        try:
            _sampling_kwargs(trial, self.seed)
        except Qwen2PureError as e:
            self.say(f"[WARNING] {e}")
            return
        self.conf = trial
        self.say(f"[INFO] Change config: {key} = {parsed!r}")

    def messages(self, query: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for q, a in self.history:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return msgs + [{"role": "user", "content": query}]

    def answer(self, query: str) -> None:
        from .generation import stream_text
        ids = self.tok.encode(self.tok.apply_chat_template(self.messages(query), add_generation_prompt=True))
        kwargs = _sampling_kwargs(self.conf, self.seed)
        room = self.model.config.max_position_embeddings - len(ids)
        if room < 1:
            self.say(f"[ERROR] The conversation ({len(ids)} tokens) no longer fits the model's context of "
                     f"{self.model.config.max_position_embeddings} tokens; :clh clears the history")
            return
        kwargs["max_new_tokens"] = min(kwargs["max_new_tokens"], room)
        self.say("\nQwen: ", end="")
        pieces: list[str] = []
        stream = stream_text(self.model, self.tok, ids, prompt_cache=self.prompt_cache, **self.speculation, **kwargs)
        try:
            for piece in stream:
                pieces.append(piece)
                self.say(piece, end="")
        except KeyboardInterrupt:
            stream.close()
            self.say("\n[WARNING] Generation interrupted")
            return
        self.say()
        self.history.append((query, "".join(pieces)))


def cmd_chat(args) -> int:
    model, tok = _load(args)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    return ChatSession(model, tok, seed=args.seed, system=args.system, name=args.loaded.name,
                       speculation=_speculation(args, tok)).run()


def cmd_inspect(args) -> int:
    from . import inspect as insp
    if args.list:
        print(insp.format_preset_list())
        return 0
    if args.compare is None:
        if args.source is None:
            raise Qwen2PureError("inspect needs a model: a preset name (see --list), a checkpoint folder or a "
                                 "config.json")
        sources = [args.source]
    else:
        sources = ([args.source] if args.source is not None else []) + args.compare
        if len(sources) != 2:
            raise Qwen2PureError(f"--compare compares two models (`inspect A --compare B` or `inspect --compare A B`); "
                                 f"got {len(sources)}: {', '.join(sources)}")
    if args.context is not None and args.context < 1:
        raise Qwen2PureError(f"--context {args.context}: must be >= 1")
    kv_dtype = insp.parse_dtype(args.dtype)
    reports = [insp.inspect_config(s, context=args.context, kv_dtype=kv_dtype) for s in sources]
    if args.plot:
        print(f"wrote {insp.plot_reports(reports, args.plot)}", file=sys.stderr)
    if args.json:
        print(insp.report_json(reports))
        return 0
    if args.tree:
        for s in sources:
            d, name, _ = insp.load_source(s)
            print(insp.module_tree(d, source=name), end="\n\n")
    print(insp.format_compare(*reports) if len(reports) == 2 else insp.format_report(reports[0]))
    return 0


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise Qwen2PureError(f"serve needs FastAPI and uvicorn ({e}): pip install \"qwen2-pure[serve]\"") from None
    from .serve.app import serve
    from .speculative import make_speculator
    model, tok = _load(args)
    serve(model, tok, host=args.host, port=args.port, api_key=args.api_key or None,
          model_name=args.served_model_name or args.loaded.name, slots=args.slots, max_seq_len=args.max_seq_len,
          max_queue=args.max_queue, log_level=args.log_level, prompt_cache_mb=args.prompt_cache_mb,
          speculator=make_speculator(**_speculation(args, tok)))
    return 0


def cmd_train(args) -> int:
    from .train.args import build_train_parser, parse_train_args
    if any(a in ("-h", "--help") for a in args.train_args):
        build_train_parser().print_help()
        return 0
    from .train.trainer import train
    targs = parse_train_args(args.train_args)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun, one set of messages
    for note in targs.notes if main_rank else ():
        print(f"[train] {note}", file=sys.stderr)
    state = train(targs)
    best = f", best checkpoint {state['best_model_checkpoint']}" if state.get("best_model_checkpoint") else ""
    if main_rank:
        print(f"[train] {state['global_step']} steps; adapter in {targs.output_dir}{best}", file=sys.stderr)
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library warning as one line, like the CLI's errors (not Python's two: location, then source)."""
    print(f"qwen2-pure: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # LLaMA-Factory's flags go to their own parser, untouched by this one's
        args = argparse.Namespace(command="train", train_args=list(argv[1:]))
    else:
        args = build_parser().parse_args(argv)
    handler = {"generate": cmd_generate, "chat": cmd_chat, "convert": cmd_convert, "export": cmd_export,
               "inspect": cmd_inspect, "serve": cmd_serve, "train": cmd_train}[args.command]
    with warnings.catch_warnings():  # restores the caller's showwarning (tests call main() in-process)
        warnings.showwarning = _show_warning
        return _run(handler, args)


def _run(handler, args) -> int:
    try:
        if args.command != "train":  # train's values are checked by its own parser
            check_values(args)
        return handler(args)
    except Qwen2PureError as e:
        print(f"qwen2-pure: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
