"""Tiny Hugging Face tokenizers and causal LMs, built in a test's temporary folder (nothing
downloads): what a user brings from the hub, at a size a test can afford."""

from __future__ import annotations

import os
import shutil

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def make_hf_tokenizer(folder: str | os.PathLike, texts: list[str], vocab_size: int = 320, bos: bool = True,
                      extra_special: tuple[str, ...] = ()) -> str:
    """A byte-level BPE trained on ``texts`` with ``tokenizers``, wrapped as transformers'
    fast tokenizer with EOS ``</s>`` (and BOS ``<s>`` when ``bos``), no pad token, saved with
    ``save_pretrained`` into ``folder``. Returns the folder."""
    specials = ["<unk>", "</s>"] + (["<s>"] if bos else []) + list(extra_special)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>" if bos else None)
    fast.save_pretrained(str(folder))
    return str(folder)


def make_hf_causal_lm(folder: str | os.PathLike, family: str, vocab_size: int, seed: int = 0,
                      tokenizer_dir: str | os.PathLike | None = None, max_positions: int = 64) -> str:
    """A tiny random ``LlamaForCausalLM`` (2 layers, hidden 32, 4 heads over 2 key-value groups)
    or ``GPT2LMHeadModel`` (2 layers, hidden 32), ``save_pretrained`` into ``folder`` with the
    tokenizer files of ``tokenizer_dir`` beside it. Weights are drawn with std 0.3 (HF's 0.02
    would give near-uniform next-token distributions). Returns the folder."""
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=max_positions, tie_word_embeddings=False,
                                             bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                             initializer_range=0.3))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4,
                                           n_positions=max_positions, bos_token_id=None, eos_token_id=None,
                                           initializer_range=0.3))
    else:
        raise ValueError(f"family {family!r}: llama or gpt2")
    model.save_pretrained(str(folder))
    if tokenizer_dir is not None:
        for name in os.listdir(tokenizer_dir):
            shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(folder, name))
    return str(folder)
