"""Tiny random-init models for tests: every supported architecture, and toy residual networks."""

from __future__ import annotations

import functools

import torch
import transformers

VOCAB = 100
ARCHS = ("gpt2", "gpt_neo", "gpt_neox", "llama", "olmo")


def config(arch: str):
    if arch == "gpt2":
        return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)
    if arch == "gpt_neo":
        return transformers.GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                         max_position_embeddings=64, attention_types=[[["global", "local"], 1]],
                                         window_size=4, bos_token_id=0, eos_token_id=0)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=64, use_parallel_residual=True,
                                          bos_token_id=0, eos_token_id=0)
    if arch == "llama":
        return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=0, eos_token_id=0)
    if arch == "olmo":
        return transformers.OlmoConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
                                       bos_token_id=1, eos_token_id=2)
    raise KeyError(arch)


def hf_model(arch: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config(arch)).eval().to(dtype)
    return model


def tokens(batch: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


@functools.lru_cache(maxsize=None)
def traced(arch: str, dtype=torch.float32):
    """(model, traced module) pairs, traced once per test session."""
    import jetfx

    model = hf_model(arch, dtype=dtype)
    return model, jetfx.trace(model, tokens())


class LinearResNet(torch.nn.Module):
    """h_{l+1} = h_l + A_l h_l, logits = U h_L: the paper's linear residual network (no final norm)."""

    def __init__(self, layers: int = 3, width: int = 5, vocab: int = 11, seed: int = 0, scale: float = 0.5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width, bias=False) for _ in range(layers))
        self.unembed = torch.nn.Linear(width, vocab, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, width, generator=g))
            for b in self.blocks:
                b.weight.copy_(scale * torch.randn(width, width, generator=g) / width**0.5)
            self.unembed.weight.copy_(torch.randn(vocab, width, generator=g))

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b(h)
        return self.unembed(h)


class TwoBlockToy(torch.nn.Module):
    """The paper's worked example: η, two non-linear blocks, decoder U∘γ_3 (a layer norm)."""

    def __init__(self, width: int = 8, vocab: int = 13, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width)
        self.block1 = torch.nn.Sequential(torch.nn.Linear(width, 16), torch.nn.Tanh(), torch.nn.Linear(16, width))
        self.block2 = torch.nn.Sequential(torch.nn.Linear(width, 16), torch.nn.GELU(), torch.nn.Linear(16, width))
        self.norm = torch.nn.LayerNorm(width)
        self.unembed = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.block1(h)
        h = h + self.block2(h)
        return self.unembed(self.norm(h))


def save_model_folder(folder, vocab: int = 256, layers: int = 2, width: int = 32, seed: int = 0) -> str:
    """A random-init Llama and a word-level tokenizer saved as a Hugging Face model folder, which
    `jetfx.load(folder)` and the CLI's `--model folder` load offline (for tests of the `jetfx`
    command in subprocesses). Words: 'The capital of France is Paris', then w0, w1, …"""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "The", "capital", "of", "France", "is", "Paris"]
    words += [f"w{i}" for i in range(vocab - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, bos_token_id=1, eos_token_id=1)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)
