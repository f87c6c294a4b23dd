"""A tiny GPT-2 BPE tokenizer trained on the spot (test helper; no downloads)."""

from __future__ import annotations

from typing import Sequence

import tokenizers
import transformers

from sld_jax import gpt2_vocab


def train_gpt2_tokenizer(out_dir: str, sentences: Sequence[str],
                         vocab_size: int) -> transformers.PreTrainedTokenizerBase:
  """A byte-level BPE saved as a GPT-2 tokenizer, <|endoftext|> last (like GPT-2)."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(sentences, trainer)
  tok.add_special_tokens([gpt2_vocab.EOS_TOKEN])
  hf_tok = transformers.GPT2TokenizerFast(
      tokenizer_object=tok, bos_token=gpt2_vocab.EOS_TOKEN, eos_token=gpt2_vocab.EOS_TOKEN,
      unk_token=gpt2_vocab.EOS_TOKEN)
  hf_tok.save_pretrained(out_dir)
  return hf_tok
