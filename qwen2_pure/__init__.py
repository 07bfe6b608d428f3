"""qwen2-pure: the Qwen2 / Qwen2.5 family in plain PyTorch.

    import qwen2_pure as q
    model = q.load_model("path/to/Qwen2.5-0.5B-Instruct")        # or a .gguf file, a modelscope id, None = demo
    tok = q.load_tokenizer("path/to/Qwen2.5-0.5B-Instruct")
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi!"}]))
    [new] = q.generate(model, [prompt], max_new_tokens=64)
    print(tok.decode(new, skip_special_tokens=True))
"""

from .config import GenerationConfig, Qwen2Config
from .errors import Qwen2PureError
from .generation import generate, stream_generate, stream_text
from .loading import Loaded, load, load_model, load_tokenizer
from .model import Qwen2ForCausalLM
from .prompt_cache import PromptCache
from .sampling import SamplingParams
from .settings import Settings

__all__ = ["GenerationConfig", "Loaded", "PromptCache", "Qwen2Config", "Qwen2ForCausalLM", "Qwen2PureError", "SamplingParams",
           "Settings", "generate", "load", "load_model", "load_tokenizer", "stream_generate", "stream_text"]
__version__ = "0.1.0"
