"""Compare qwen2-pure with transformers on any checkpoint folder: logits and greedy tokens, side by side.

    python tools/parity.py --model path/to/Qwen2.5-7B-Instruct --dtype bfloat16 --new-tokens 32
    python tools/parity.py                       # the demo checkpoint, fp32

Both engines load the same folder in the same dtype (transformers with eager attention, whose op order
ours follows). Prints the max |Δlogit| over prompt + answer, how many greedy tokens agree, and both texts.
Needs transformers (the `dev` extra); qwen2-pure itself never imports it.
"""

from __future__ import annotations

import argparse
import json

import torch

import qwen2_pure as q


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder or modelscope id (default: the demo model)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompt", default="Explain grouped-query attention in two sentences.")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    import transformers

    if args.model is None:  # the demo: transformers needs its HF-layout folder, converted once
        from qwen2_pure.loading.demo import demo_model_dir
        path = demo_model_dir()
    else:
        path = q.loading.resolve_source(args.model)
    if path.is_file():
        raise SystemExit(f"{path}: transformers needs a folder; run `qwen2-pure convert {path} OUT_DIR` first")
    dtype = getattr(torch, args.dtype)
    tok = q.load_tokenizer(path)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": args.prompt}]))
    ours = q.load_model(path, dtype=dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    x = torch.tensor([prompt])
    with torch.inference_mode():
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens, do_sample=False,
                          top_k=None, top_p=None, temperature=None, eos_token_id=None,
                          pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
        got = q.generate(ours, [prompt], max_new_tokens=args.new_tokens, stop_token_ids=[])[0]
        seq = torch.tensor([prompt + ref])
        a, b = ours(seq)[0].float(), hf(seq).logits[0].float()
    agree = next((i for i, (u, v) in enumerate(zip(got, ref)) if u != v), len(ref))
    report = {"model": str(path), "dtype": args.dtype, "positions": seq.shape[1],
              "max_abs_logit_delta": (a - b).abs().max().item(), "max_abs_logit": b.abs().max().item(),
              "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
              "identical_greedy_prefix": f"{agree}/{len(ref)}",
              "ours": tok.decode(got, skip_special_tokens=True), "transformers": tok.decode(ref, skip_special_tokens=True)}
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
