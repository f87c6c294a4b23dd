"""The released SLD training step, re-expressed in PyTorch as a benchmark peer.

What the released code (``SpokenNLP/sld``, ``run_clm.py`` with
``transformers.GPT2LMHeadModel``, run by ``run.sh``) does per training step,
kept here with the same tensor shapes and the same operations, on the CPU and
in float32 (the release ran fp16 on GPUs):

* Ids (released layout, G = GPT-2 text ids): text ``[0, G)``,
  ``<text_end>`` = G, ``<speech_end>`` = G + 1, unit u = G + 2 + u; the
  vocabulary has G + 2 + K rows.
* Rows: every sequence ``units <speech_end> text <text_end>`` is padded to
  ``block_size`` (1024 in ``run.sh``); one sequence per row::

    input_ids       [u u u se t t te  pad pad ... pad]     (block_size)
    attention_mask  [1 1 1 1  1 1 1   0   0   ... 0  ]
    labels          [u u u se t t te -100 -100 ... -100]

* Time masking: every input id (padding included) becomes the tokenizer's
  EOS with probability ``time_mask``; labels are a separate tensor and stay.
* ``model(input_ids, attention_mask, labels)``: passing ``labels`` makes
  transformers compute its own full-vocabulary CE too (unused by the
  objective, but part of the released step's cost; ``hf_internal_loss``).
* Loss, all on shifted ``[B, block_size - 1]`` positions::

    ce_text    CE over the full vocabulary, labels < G + 1 (text + <text_end>)
    ce_speech  CE over the full vocabulary, labels >= G + 1 (<speech_end> + units)
    kl_speech  KLDivLoss(batchmean)(log_softmax(s / T), softmax(q' / T)) * T^2
               s  = logits[..., -K:] * mask + 1e-9                [B, L-1, K]
               q' = (one_hot(clamp(label - G - 2, 0)) * (1 - eps) + eps / K)
                    * mask + 1e-9                                  [B, L-1, K]
    loss = ce_speech + ce_text + alpha * kl_speech

  ``batchmean`` divides the sum over ``[B, L-1, K]`` by B (sequences).
  Padded positions have uniform student and target: they add 0.
* AdamW (lr 3e-4, weight decay 0 in two parameter groups), linear decay,
  ``optimizer.step(); lr_scheduler.step(); optimizer.zero_grad()``.

``sld_jax``'s ``LossConfig(method="sld", kl_target="reference")`` computes
the same objective (``sld_jax/losses.py``); ``train_throughput.py
--check_equivalence`` compares the two losses on the same weights and rows.

sld_jax ids map one to one onto a released layout with the same number of
real ids (``released_vocab_of``: released G = sld ``text_size - 1``)::

  sld id       0 (PAD)   1 (EOS)          2 .. G_sld-1   G_sld (<se>) ..
  released id  G - 1     G (<text_end>)   0 .. G - 2     same id

(the released pad id is GPT-2's ``<|endoftext|>``, its last text id G - 1), so
sld_jax weights with their embedding rows permuted (``released_from_sld``)
are the same network under the released ids.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
import transformers

from sld_jax.model.config import decoder_config
from sld_jax.vocab import VocabLayout

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class ReleasedVocab:
  """The released id layout: G text ids, <text_end>, <speech_end>, K units."""

  gpt_vocab_size: int
  speech_size: int

  @property
  def text_end_id(self) -> int:
    return self.gpt_vocab_size

  @property
  def speech_end_id(self) -> int:
    return self.gpt_vocab_size + 1

  @property
  def vocab_size(self) -> int:
    return self.gpt_vocab_size + 2 + self.speech_size

  @property
  def pad_id(self) -> int:
    """``model.config.pad_token_id = tokenizer.eos_token_id``: GPT-2's last text id."""
    return self.gpt_vocab_size - 1


def released_vocab_of(layout: VocabLayout) -> ReleasedVocab:
  """The released layout with as many real ids as ``layout.real_size``."""
  return ReleasedVocab(gpt_vocab_size=layout.text_size - 1, speech_size=layout.speech_size)


def released_id_map(layout: VocabLayout) -> np.ndarray:
  """``[real_size]``: released id of each sld_jax id (module docstring).

  ``VocabLayout(5, 3)`` (<speech_end>=5, units 6..8) -> released G=4::

    sld id       0 1 2 3 4 5 6 7 8
    released id  3 4 0 1 2 5 6 7 8
  """
  vocab = released_vocab_of(layout)
  ids = np.arange(layout.real_size, dtype=np.int64)
  out = ids.copy()
  out[0], out[1] = vocab.pad_id, vocab.text_end_id
  out[2:layout.text_size] = ids[2:layout.text_size] - 2
  return out


def to_released_ids(sequence: np.ndarray, layout: VocabLayout) -> np.ndarray:
  """sld_jax ids -> released ids; PAD is not allowed in a sequence.

  ``VocabLayout(5, 3)``: sld ``[6 8 5 3 4 1]`` (u0 u2 <se> t3 t4 <text_end>)
  -> released ``[6 8 5 1 2 4]``.
  """
  sequence = np.asarray(sequence, np.int64)
  if np.any(sequence == 0):
    raise ValueError("to_released_ids: sequences must not contain PAD (0)")
  layout.check_ids(sequence, "to_released_ids")
  return released_id_map(layout)[sequence]


def padded_rows(sequences: Sequence[np.ndarray], vocab: ReleasedVocab,
                length: Optional[int]) -> dict[str, torch.Tensor]:
  """Released rows: one sequence per row, right-padded to ``length``.

  ``length=None`` pads to the longest sequence of the batch instead (a
  stronger peer than the release, which always pads to ``block_size``).
  """
  longest = max(len(s) for s in sequences)
  length = longest if length is None else length
  if longest > length:
    raise ValueError(f"padded_rows: a sequence has {longest} tokens, block_size is {length}")
  input_ids = np.full((len(sequences), length), vocab.pad_id, np.int64)
  attention_mask = np.zeros((len(sequences), length), np.int64)
  labels = np.full((len(sequences), length), IGNORE_INDEX, np.int64)
  for row, sequence in enumerate(sequences):
    input_ids[row, :len(sequence)] = sequence
    attention_mask[row, :len(sequence)] = 1
    labels[row, :len(sequence)] = sequence
  return {"input_ids": torch.from_numpy(input_ids),
          "attention_mask": torch.from_numpy(attention_mask),
          "labels": torch.from_numpy(labels)}


def build_model(size: str, vocab: ReleasedVocab, block_size: int,
                dropout_rate: float = 0.1) -> transformers.GPT2LMHeadModel:
  """A randomly initialised GPT2LMHeadModel with sld_jax's named dimensions."""
  dims = decoder_config(size, vocab_size=vocab.vocab_size)
  config = transformers.GPT2Config(
      vocab_size=vocab.vocab_size, n_positions=block_size, n_embd=dims.embed_dim,
      n_layer=dims.num_layers, n_head=dims.num_heads, n_inner=dims.mlp_dim,
      resid_pdrop=dropout_rate, embd_pdrop=dropout_rate, attn_pdrop=dropout_rate,
      activation_function="gelu_new", pad_token_id=vocab.pad_id,
      bos_token_id=vocab.pad_id, eos_token_id=vocab.pad_id)
  return transformers.GPT2LMHeadModel(config)


def released_from_sld(params, config, layout: VocabLayout,
                      block_size: int) -> transformers.GPT2LMHeadModel:
  """The sld_jax network as a released-layout GPT2LMHeadModel (same function).

  Exports with ``sld_jax.hf_gpt2.export_hf_gpt2`` (sld id order), then keeps
  the ``real_size`` real rows and moves row i to ``released_id_map[i]``.
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  from sld_jax import hf_gpt2  # pylint: disable=g-import-not-at-top
  vocab = released_vocab_of(layout)
  with tempfile.TemporaryDirectory() as directory:
    hf_gpt2.export_hf_gpt2(params, config, layout, directory)
    exported = transformers.GPT2LMHeadModel.from_pretrained(directory)
  model = build_model_like(exported.config, vocab, block_size)
  state = exported.state_dict()
  wte = state["transformer.wte.weight"][:layout.real_size]
  permuted = torch.empty_like(wte)
  permuted[torch.from_numpy(released_id_map(layout))] = wte
  state["transformer.wte.weight"] = permuted
  state["lm_head.weight"] = permuted
  model.load_state_dict(state)
  return model


def build_model_like(config: transformers.GPT2Config, vocab: ReleasedVocab,
                     block_size: int) -> transformers.GPT2LMHeadModel:
  config = transformers.GPT2Config(**{
      **config.to_dict(), "vocab_size": vocab.vocab_size, "n_positions": block_size,
      "pad_token_id": vocab.pad_id, "bos_token_id": vocab.pad_id,
      "eos_token_id": vocab.pad_id})
  return transformers.GPT2LMHeadModel(config)


def released_loss(model: nn.Module, batch: dict[str, torch.Tensor], vocab: ReleasedVocab, *,
                  alpha: float = 0.008, epsilon: float = 0.1, temperature: float = 1.0,
                  time_mask: float = 0.3, hf_internal_loss: bool = True,
                  generator: Optional[torch.Generator] = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
  """The released ``all_loss`` (module docstring); returns (loss, parts).

  ``batch`` is modified in place by time masking, as in the release.
  """
  if time_mask > 0.0:
    coin = torch.rand(batch["input_ids"].shape, generator=generator,
                      device=batch["input_ids"].device) < time_mask
    batch["input_ids"][coin] = vocab.pad_id
  labels = batch["labels"]
  outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  labels=labels if hf_internal_loss else None)
  logits = outputs.logits
  num_units = vocab.speech_size
  mask = batch["attention_mask"]
  tiny = 1e-9
  student = logits[:, :-1, -num_units:].contiguous() * mask[:, :-1].unsqueeze(-1) + tiny
  unit_class = (labels[:, 1:] - vocab.gpt_vocab_size - 2) * mask[:, 1:]
  unit_class[unit_class < 0] = 0
  one_hot = nn.functional.one_hot(unit_class, num_classes=num_units)
  target = one_hot * (1 - epsilon) + epsilon / num_units
  target = target * mask[:, 1:].unsqueeze(-1) + tiny
  kl_speech = nn.KLDivLoss(reduction="batchmean")(
      nn.functional.log_softmax(student / temperature, dim=-1),
      nn.functional.softmax(target / temperature, dim=-1)) * temperature ** 2
  shift_logits = logits[..., :-1, :].contiguous()
  shift_labels = labels[..., 1:].contiguous()
  text_labels = torch.where(shift_labels >= vocab.gpt_vocab_size + 1, IGNORE_INDEX, shift_labels)
  speech_labels = torch.where(shift_labels < vocab.gpt_vocab_size + 1, IGNORE_INDEX, shift_labels)
  flat_logits = shift_logits.view(-1, shift_logits.size(-1))
  ce_text = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)(flat_logits, text_labels.view(-1))
  ce_speech = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)(flat_logits, speech_labels.view(-1))
  loss = ce_speech + ce_text + alpha * kl_speech
  return loss, {"ce_text": ce_text, "ce_speech": ce_speech, "kl_speech": kl_speech}


class ReleasedTrainer:
  """Model, AdamW and linear schedule of the release; ``step`` is one update."""

  def __init__(self, model: transformers.GPT2LMHeadModel, vocab: ReleasedVocab, *,
               learning_rate: float = 3e-4, total_steps: int = 1000, seed: int = 0,
               device: str = "cpu", autocast_dtype: Optional[torch.dtype] = None,
               compile_model: bool = False, **loss_kwargs):
    """``device="cuda"`` with ``autocast_dtype=torch.bfloat16``, fused AdamW and
    ``compile_model=True`` (``torch.compile``) is the strongest GPU peer."""
    model = model.to(device)
    self.device = torch.device(device)
    self.autocast_dtype = autocast_dtype
    self.forward_model = torch.compile(model) if compile_model else model
    self.model = model
    self.vocab = vocab
    self.loss_kwargs = loss_kwargs
    no_decay = ("bias", "layer_norm.weight")
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not any(nd in n for nd in no_decay)],
         "weight_decay": 0.0},
        {"params": [p for n, p in named if any(nd in n for nd in no_decay)],
         "weight_decay": 0.0},
    ]
    self.optimizer = torch.optim.AdamW(groups, lr=learning_rate,
                                       fused=self.device.type == "cuda")
    self.scheduler = transformers.get_scheduler(
        "linear", optimizer=self.optimizer, num_warmup_steps=0, num_training_steps=total_steps)
    self.generator = torch.Generator(device=self.device).manual_seed(seed)
    model.train()

  def step(self, batch: dict[str, torch.Tensor]) -> float:
    """One optimizer update on ``batch`` (padded rows); returns the loss."""
    batch = {name: value.to(self.device, copy=True) for name, value in batch.items()}
    with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                        enabled=self.autocast_dtype is not None):
      loss, _ = released_loss(self.forward_model, batch, self.vocab, generator=self.generator,
                              **self.loss_kwargs)
    loss.backward()
    self.optimizer.step()
    self.scheduler.step()
    self.optimizer.zero_grad()
    return float(loss.detach())


def real_targets(batch: dict[str, torch.Tensor]) -> int:
  """Shifted labels that are not ignored: what the released step trains on."""
  return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
