"""A tiny random-weight causal LM with a locally trained tokenizer.

SMOKE-TEST MODEL: its weights are random, so the text it writes is meaningless.
It exists so that ptserve can be installed, served and tested with no network:
`ptserve tiny-model DIR` writes it, `ptserve serve --model DIR` loads it through
the same `from_pretrained` path as any real checkpoint.

The weights are drawn with a large standard deviation ("sharpened") so that the
next-token distribution is peaked and greedy outputs depend on the prompt,
which the correctness tests need.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ARCHS = ("gpt2", "llama")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
_CORPUS_MODULES = (
    "json",
    "collections",
    "argparse",
    "logging",
    "pathlib",
    "functools",
    "itertools",
    "re",
    "string",
    "textwrap",
)


def local_corpus() -> list[str]:
    """English text that ships with Python itself: stdlib docstrings."""
    texts = []
    for name in _CORPUS_MODULES:
        mod = importlib.import_module(name)
        for obj in [mod, *vars(mod).values()]:
            doc = (
                inspect.getdoc(obj)
                if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj))
                else None
            )
            if doc:
                texts.append(doc)
    return texts


def train_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(local_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_tiny_model(
    arch: str = "gpt2", seed: int = 0, hidden_size: int = 64, num_layers: int = 2, init_std: float = 0.5
):
    """(model, tokenizer) with random weights drawn N(0, init_std)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    tokenizer = train_tokenizer()
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(
            n_embd=hidden_size, n_layer=num_layers, n_head=4, n_positions=512, initializer_range=init_std, **ids
        )
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            initializer_range=init_std,
            tie_word_embeddings=False,
            **ids,
        )
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer


def write_tiny_model(directory: str | Path, arch: str = "gpt2", seed: int = 0) -> Path:
    directory = Path(directory)
    model, tokenizer = build_tiny_model(arch, seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "README.txt").write_text(
        "ptserve tiny smoke-test model: RANDOM WEIGHTS, its output is meaningless text.\n"
        f"arch={arch} seed={seed}. Made by `ptserve tiny-model`.\n"
    )
    return directory
