"""Converts pretrained GPT-2 to sld_jax params and sld_jax params back to GPT-2.

Import a local Hugging Face GPT-2 directory into an orbax params checkpoint
(``OUT/params`` + ``OUT/sld_jax_params.json``), usable as the training init
(``sld_jax.hf_gpt2.init_params_from(OUT, config, layout)``)::

  python scripts/convert_gpt2.py import --hf_dir /models/gpt2-medium \\
      --speech_size 6000 --size gpt2_medium --out /ckpt/gpt2m_init

Export such a directory, or a training checkpoint step
(``MODEL_DIR/checkpoints/STEP``, whose config/layout come from the flags),
to a HF GPT-2 directory::

  python scripts/convert_gpt2.py export --params /ckpt/gpt2m_init --out /hf/out
  python scripts/convert_gpt2.py export --checkpoint MODEL_DIR/checkpoints/5000 \\
      --size gpt2_medium --tokenizer_dir /models/gpt2-medium --speech_size 6000 \\
      --out /hf/out --vocab_order sld

``--vocab_order sld`` keeps every row in sld_jax id order (the model reads
and predicts sld_jax ids); ``gpt2`` writes the text rows only, in GPT-2 order
(a plain GPT-2 text model for the original tokenizer). See
``sld_jax/hf_gpt2.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import jax

from sld_jax import checkpointing
from sld_jax import gpt2_vocab
from sld_jax import hf_gpt2
from sld_jax import hf_gpt2_files
from sld_jax import vocab as vocab_lib
from sld_jax.model.config import DecoderConfig
from sld_jax.model.config import decoder_config


def _expected_config(args, vocab_size: int, hf=None) -> DecoderConfig:
  """``--size`` (checked against the checkpoint), else the checkpoint's own shape."""
  overrides = {"scan_layers": args.scan_layers}
  if args.max_length is not None:
    overrides["max_length"] = args.max_length
  if args.size is None:
    return hf_gpt2.decoder_config_of(hf, vocab_size).replace(**overrides)
  return decoder_config(size=args.size, vocab_size=vocab_size, **overrides)


def run_import(args) -> None:
  hf = hf_gpt2_files.read_hf_config(args.hf_dir)
  id_map = gpt2_vocab.text_id_map_of_dir(args.hf_dir)
  layout = vocab_lib.VocabLayout(text_size=id_map.text_size, speech_size=args.speech_size)
  expected = _expected_config(args, layout.size, hf)
  config, params, layout, id_map = hf_gpt2.load_hf_gpt2(
      args.hf_dir, layout=layout, expected_config=expected, init_seed=args.seed,
      new_row_init=args.new_row_init)
  hf_gpt2.save_params(params, args.out, config=config, layout=layout, text_id_map=id_map,
                      source=os.path.abspath(args.hf_dir))
  print(f"imported {args.hf_dir} ({hf.n_layer} layers, d={hf.n_embd}, "
        f"{hf.vocab_size} GPT-2 ids) -> {args.out}/{hf_gpt2.PARAMS_SUBDIR}: "
        f"text_size={layout.text_size}, speech_size={layout.speech_size}, "
        f"vocab rows={layout.size}")


def _trainer_params(step_dir: str):
  """The ``params`` of a TrainState written by ``sld_jax.checkpointing``.

  Read by the shared checkpoint reader, so the step's checksums are verified.
  """
  step_dir = os.path.abspath(step_dir)
  if not (os.path.isdir(os.path.join(step_dir, "state"))
          and os.path.basename(step_dir).isdigit()):
    raise FileNotFoundError(f"{step_dir} is not a training checkpoint step (no state/)")
  step = int(os.path.basename(step_dir))
  with contextlib.closing(checkpointing.Checkpointer(os.path.dirname(step_dir),
                                                     read_only=True)) as reader:
    tree = reader.state_metadata(step)
    if "params" not in tree:
      raise ValueError(f"{step_dir}/state holds no 'params' (keys {sorted(tree)})")
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["params"])
    return reader.restore_params(target, step)


def run_export(args) -> None:
  id_map = None
  if args.params is not None:
    meta_file = os.path.join(args.params, hf_gpt2.PARAMS_METADATA)
    if not os.path.exists(meta_file):
      raise FileNotFoundError(f"{meta_file} missing: not a convert_gpt2.py import directory")
    with open(meta_file, encoding="utf-8") as f:
      meta = json.load(f)
    config = DecoderConfig(**meta["config"])
    layout = vocab_lib.VocabLayout(**meta["layout"])
    if meta.get("text_id_map") is not None:
      id_map = gpt2_vocab.TextIdMap.from_json(meta["text_id_map"], meta_file)
    params = hf_gpt2.restore_params(args.params, config, layout)
  else:
    if args.size is None or args.speech_size is None:
      raise ValueError("--checkpoint needs --size and --speech_size")
    if args.tokenizer_dir is not None:
      id_map = gpt2_vocab.text_id_map_of_dir(args.tokenizer_dir)
      text_size = id_map.text_size
    elif args.text_size is not None:
      text_size = args.text_size
    else:
      raise ValueError("--checkpoint needs --tokenizer_dir (GPT-2 text) or --text_size")
    layout = vocab_lib.VocabLayout(text_size=text_size, speech_size=args.speech_size)
    config = _expected_config(args, layout.size)
    params = _trainer_params(args.checkpoint)
  hf_gpt2.export_hf_gpt2(params, config, layout, args.out, text_id_map=id_map,
                         vocab_order=args.vocab_order, tokenizer_dir=args.tokenizer_dir)
  print(f"exported ({args.vocab_order} order, {config.num_layers} layers) -> {args.out}")


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)

  def model_flags(p):
    p.add_argument("--size", help="expected model size (tiny, gpt2_small, gpt2_medium)")
    p.add_argument("--max_length", type=int, help="positions to keep (<= n_positions)")
    p.add_argument("--scan_layers", action="store_true", help="stacked 'layers' params")

  imp = commands.add_parser("import", help="HF GPT-2 dir -> orbax params")
  imp.add_argument("--hf_dir", required=True)
  imp.add_argument("--out", required=True)
  imp.add_argument("--speech_size", type=int, required=True, help="K speech units")
  imp.add_argument("--new_row_init", default="mean", choices=hf_gpt2.NEW_ROW_INITS)
  imp.add_argument("--seed", type=int, default=0)
  model_flags(imp)

  exp = commands.add_parser("export", help="sld_jax params -> HF GPT-2 dir")
  source = exp.add_mutually_exclusive_group(required=True)
  source.add_argument("--params", help="a directory written by 'import'")
  source.add_argument("--checkpoint", help="MODEL_DIR/checkpoints/STEP of a training run")
  exp.add_argument("--out", required=True)
  exp.add_argument("--vocab_order", default="sld", choices=hf_gpt2.VOCAB_ORDERS)
  exp.add_argument("--tokenizer_dir", help="GPT-2 tokenizer to copy / to map text ids")
  exp.add_argument("--text_size", type=int, help="text ids of a non-GPT-2 (SentencePiece) run")
  exp.add_argument("--speech_size", type=int)
  model_flags(exp)
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.command == "import":
    run_import(args)
  else:
    run_export(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
