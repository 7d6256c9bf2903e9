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
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

# gpt2, llama: causal LMs; bert: a masked LM; bert-encoder: a BERT with no LM head
ARCHS = ("gpt2", "llama", "bert", "bert-encoder")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
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


def train_tokenizer(vocab_size: int = 512, add_bos: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE. `add_bos`: prepend <s> by default, as Llama tokenizers do."""
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
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def train_wordpiece_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A lower-casing WordPiece tokenizer with BERT's special tokens."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(local_corpus(), trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def build_tiny_model(
    arch: str = "gpt2", seed: int = 0, hidden_size: int = 64, num_layers: int = 2, init_std: float = 0.5
):
    """(model, tokenizer) with random weights drawn N(0, init_std)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    if arch.startswith("bert"):
        return _build_tiny_bert(arch, seed, hidden_size, num_layers, init_std)
    tokenizer = train_tokenizer(add_bos=arch == "llama")
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


def _build_tiny_bert(arch: str, seed: int, hidden_size: int, num_layers: int, init_std: float):
    tokenizer = train_wordpiece_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=512,
        initializer_range=init_std,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = BertForMaskedLM(config) if arch == "bert" else BertModel(config, add_pooling_layer=False)
    return model.eval(), tokenizer


def write_tiny_model(directory: str | Path, arch: str = "gpt2", seed: int = 0, init_std: float = 0.5) -> Path:
    directory = Path(directory)
    model, tokenizer = build_tiny_model(arch, seed, init_std=init_std)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "README.txt").write_text(
        "ptserve tiny smoke-test model: RANDOM WEIGHTS, its output is meaningless text.\n"
        f"arch={arch} seed={seed} init_std={init_std}. Made by `ptserve tiny-model`.\n"
    )
    return directory
