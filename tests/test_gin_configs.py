"""Every shipped gin file parses; every experiment finalizes and builds its model.

Experiments are parsed like the command line does it (``gin_utils``), with
their required macros given; then the model, the optimizer and the data
sources are built from the config. Small models are initialised and run on
a tiny batch; large ones (GPT-2 small / medium) are only traced with
``jax.eval_shape``. LibriSpeech experiments get a stand-in vocabulary layout
of the paper's size (the real one comes from the user's prepared data).
"""

from __future__ import annotations

import functools
import glob
import os
import re
import subprocess
import sys

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from sld_jax import gin_utils
from sld_jax import input_pipeline
from sld_jax import lm
from sld_jax import losses
from sld_jax import optim
from sld_jax.vocab import VocabLayout

GIN_DIR = gin_utils.GIN_CONFIGS_DIR
ALL_FILES = sorted(os.path.relpath(p, gin_utils.GIN_ROOT)
                   for p in glob.glob(os.path.join(GIN_DIR, "**", "*.gin"), recursive=True))
EXPERIMENTS = [p for p in ALL_FILES if p.startswith("gin_configs/experiments/")]
REQUIRED = ('MODEL_DIR="/tmp/unused"', "TRAIN_STEPS=1000",
            'WAVLM_UNITS_DIR="/tmp/unused_wavlm"', 'HUBERT_UNITS_DIR="/tmp/unused_hubert"',
            'INIT_FROM="/tmp/unused_gpt2"')
EVAL_GIN = "gin_configs/runs/eval.gin"   # the eval command's run file
GPU_FAST_GIN = "gin_configs/runs/gpu_fast.gin"
# The paper's vocabulary: a text model plus 6000 unit pieces.
PAPER_LAYOUT = VocabLayout(text_size=1000, speech_size=6000)
SMALL_LAYOUT = VocabLayout(text_size=40, speech_size=128)


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _includes(path: str) -> set[str]:
  with open(os.path.join(gin_utils.GIN_ROOT, path)) as f:
    direct = re.findall(r"^include '([^']+)'", f.read(), re.M)
  return set(direct).union(*[_includes(p) for p in direct]) if direct else set()


def test_shipped_files_are_found():
  assert "gin_configs/experiments/smoke.gin" in EXPERIMENTS
  assert {"gin_configs/experiments/librispeech_wavlm_sld.gin",
          "gin_configs/experiments/librispeech_hubert_sld.gin"} <= set(EXPERIMENTS)
  for name in ("models/tiny.gin", "models/gpt2_small.gin", "models/gpt2_medium.gin",
               "objectives/loss_masking.gin", "objectives/multimodal_ce.gin",
               "objectives/sld.gin", "objectives/sld_reference.gin", "runs/train.gin",
               "runs/train_eval.gin", "runs/eval.gin"):
    assert f"gin_configs/{name}" in ALL_FILES, name


def test_files_parse_from_another_directory_with_the_checkout_on_the_path(tmp_path):
  # gin's package-resource reader used to crash (TypeError) on the
  # gin_configs namespace package when the checkout is on sys.path.
  script = ("import sys; sys.path.insert(0, sys.argv[1]); import gin; "
            "from sld_jax import gin_utils; "
            "gin_utils.parse_gin_config(['gin_configs/experiments/demo.gin'], "
            "['MODEL_DIR=\"/tmp/x\"'], finalize=False); "
            "print(gin.query_parameter('%TRAIN_STEPS'))")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = subprocess.run([sys.executable, "-c", script, gin_utils.GIN_ROOT], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1].isdigit()


@pytest.mark.parametrize("path", ALL_FILES)
def test_every_file_parses(path):
  gin.parse_config_file(path)


def test_every_component_is_finalized_by_some_experiment():
  used = set().union(*[_includes(p) for p in EXPERIMENTS])
  unused = [p for p in ALL_FILES if p not in EXPERIMENTS and p not in used]
  # gpt2_small is a model choice offered to users; its own test is below. The
  # eval command's run file is added to an experiment by sld_jax.eval (below);
  # gpu_fast.gin is added by users on a GPU (below); sld_mask_text_end.gin is
  # an arm of the objective comparison (python -m sld_jax.comparison).
  assert unused == ["gin_configs/models/gpt2_small.gin",
                    "gin_configs/objectives/sld_mask_text_end.gin", EVAL_GIN,
                    GPU_FAST_GIN], unused


def _gpt2_param_count(layers: int, embed: int, vocab: int, positions: int = 1024) -> int:
  """Hugging Face GPT-2's count: 12E^2 + 13E per block, tied wte, wpe, ln_f.

  With the GPT-2 text vocabulary (50257) this gives 124.4M and 354.8M for
  small and medium.
  """
  return layers * (12 * embed ** 2 + 13 * embed) + (vocab + positions) * embed + 2 * embed


def _tiny_batch(layout: VocabLayout, length: int = 16):
  source = input_pipeline.SyntheticSource(
      text_size=layout.text_size, speech_size=layout.speech_size, global_batch_size=2,
      sequence_length=length, max_units=6)
  return source.global_batch(0)


def _build_and_check_model(layout: VocabLayout, run: bool = False):
  """Builds SpeechTextLM from the active gin config and traces its loss.

  With ``run`` the parameters are really initialised and the loss computed
  on a tiny batch; otherwise only shapes are traced (``jax.eval_shape``).
  """
  model = lm.SpeechTextLM(layout)
  assert model.config.vocab_size == layout.size
  init = lambda key: nn.meta.unbox(model.init_params(key))  # noqa: E731
  batch = _tiny_batch(layout)
  params = (jax.jit(init) if run else functools.partial(jax.eval_shape, init))(
      jax.random.key(0))
  num_params = sum(x.size for x in jax.tree.leaves(params))
  loss, aux = (jax.jit(model.loss_fn) if run else functools.partial(
      jax.eval_shape, model.loss_fn))(params, batch, jax.random.key(1))
  assert loss.shape == () and aux["ce_text"].shape == ()
  if run:
    assert np.isfinite(float(loss)) and int(aux["num_text_tokens"]) > 0
  return model, num_params


@pytest.mark.parametrize("path", EXPERIMENTS)
def test_experiment_finalizes_and_builds(path):
  gin_utils.parse_gin_config([path], REQUIRED)
  paper = "librispeech" in path
  model, num_params = _build_and_check_model(PAPER_LAYOUT if paper else SMALL_LAYOUT,
                                            run=path.endswith("/smoke.gin"))

  schedule = optim.learning_rate_schedule(total_steps=1000)
  tx = optim.make_optimizer(learning_rate=schedule)
  assert callable(tx.init)
  source = gin.query_parameter("trainer.train.train_data").scoped_configurable_fn()
  assert isinstance(source, input_pipeline.BatchSource)
  assert source.global_batch_size == gin.query_parameter("%BATCH_SIZE")
  assert source.sequence_length == gin.query_parameter("%SEQUENCE_LENGTH")
  assert source.sequence_length <= model.config.max_length
  evaluators = gin.query_parameter("trainer.train.evaluators")
  assert [e.configurable.name for e in evaluators] == ["DecodingEvaluator"]
  dev = gin.query_parameter("evaluators.DecodingEvaluator.data").scoped_configurable_fn()
  assert isinstance(dev, input_pipeline.BatchSource)

  if paper:
    # The released recipe: GPT-2 medium, 64 x 1024, AdamW 3e-4 linear, no
    # warmup, time masking 0.3, dropout 0.1, SLD knobs 0.008 / 0.1 / 1.
    config = model.config
    assert (config.num_layers, config.embed_dim, config.num_heads, config.mlp_dim) == (
        24, 1024, 16, 4096)
    assert config.dropout_rate == 0.1 and config.dtype == "bfloat16"
    assert num_params == _gpt2_param_count(24, 1024, PAPER_LAYOUT.size), num_params
    assert (source.global_batch_size, source.sequence_length) == (64, 1024)
    np.testing.assert_allclose([float(schedule(0)), float(schedule(500)), float(schedule(1000))],
                               [3e-4, 1.5e-4, 0.0], rtol=1e-6, atol=1e-12)
    assert gin.query_parameter("make_optimizer.clip_grad_norm") is None
    assert model.time_mask_prob == 0.3
    method = model.loss_config.method
    expected = {"_sld.gin": ("sld", "reference"), "_sld_paper.gin": ("sld", "paper"),
                "_loss_masking.gin": ("loss_masking", "paper"),
                "_multimodal_ce.gin": ("multimodal_ce", "paper")}
    suffix = next(s for s in expected if path.endswith(s))
    assert (method, model.loss_config.kl_target) == expected[suffix]
    if method == "sld":
      assert (model.loss_config.alpha, model.loss_config.epsilon,
              model.loss_config.temperature) == (0.008, 0.1, 1.0)
    units = "WAVLM" if "wavlm" in path else "HUBERT"
    import tasks.registry  # pylint: disable=g-import-not-at-top
    assert tasks.registry.librispeech_prepared_dir() == f"/tmp/unused_{units.lower()}"
    assert model.loss_config.kl_normalization == "sequence"
    assert gin.query_parameter("hf_gpt2.init_params_from.new_row_init") == "normal"
    if paper:  # initialised from pretrained GPT-2 with its own text tokens
      assert source.task_name == tasks.registry.LIBRISPEECH_GPT2_TASK
      assert tasks.registry.gpt2_tokenizer_dir() == "/tmp/unused_gpt2"
      assert gin.query_parameter("%INIT_FROM") == "/tmp/unused_gpt2"


EVAL_REQUIRED = ('CHECKPOINT_PATH="/tmp/run"', 'EVAL_OUTPUT_DIR="/tmp/run/eval"')


def _eval_bindings(path: str) -> list[str]:
  """The eval macros plus the data macros the experiment's task requires."""
  if "librispeech" not in path:
    return list(EVAL_REQUIRED)
  units = [b for b in REQUIRED if b.startswith("WAVLM" if "wavlm" in path else "HUBERT")]
  return [*EVAL_REQUIRED, *units, 'INIT_FROM="/tmp/unused_gpt2"']


@pytest.mark.parametrize("path", [p for p in EXPERIMENTS if not p.endswith("/synthetic.gin")])
def test_experiment_with_the_eval_run_file_configures_evaluate(path):
  """``python -m sld_jax.eval --gin_file=<experiment>``: the experiment, then
  runs/eval.gin, needs only the eval macros (no MODEL_DIR or TRAIN_STEPS)."""
  from sld_jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
  eval_lib.configure([path], _eval_bindings(path))
  assert str(gin.query_parameter("evaluate.checkpoint_path")) == "%CHECKPOINT_PATH"
  assert gin.query_parameter("%CHECKPOINT_PATH") == "/tmp/run"
  assert gin.query_parameter("%EVAL_OUTPUT_DIR") == "/tmp/run/eval"
  assert gin.query_parameter("%TASK") and gin.query_parameter("%BATCH_SIZE") > 0
  assert [str(t) for t in gin.query_parameter("evaluate.task_names")] == ["%TASK"]
  assert gin.query_parameter("evaluate.model").configurable.wrapper is lm.SpeechTextLM
  gin.clear_config()
  eval_lib.configure([path, EVAL_GIN], _eval_bindings(path))   # as t5x is called: the same


def test_the_eval_run_file_requires_its_macros_and_a_task():
  from sld_jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"EVAL_OUTPUT_DIR.*--gin\.EVAL_OUTPUT_DIR="):
    eval_lib.configure(["gin_configs/experiments/smoke.gin"], ['CHECKPOINT_PATH="/tmp/run"'])
  gin.clear_config()
  with pytest.raises(ValueError, match="defines no TASK macro"):
    eval_lib.configure(["gin_configs/experiments/synthetic.gin"], EVAL_REQUIRED)


# Initial loss. At initialisation the logits are nearly flat: the final
# LayerNorm gives unit-variance features and the tied embeddings have std
# 0.02, so logits have std sigma ~ 0.02 * sqrt(E) (0.32 at E=256, 0.64 at
# E=1024) and a token's expected cross-entropy is log(V) + sigma^2 / 2 <= 0.2
# above log(V), V the real vocabulary. Over the ~70 text and ~130 speech
# tokens of the batch the mean moves by less than 0.2 more; a known run gives
# |ce - log V| <= 0.18 for every experiment. 0.5 leaves room for other
# initialisations yet fails a loss that is off by a term, a factor or a
# vocabulary slice.
INITIAL_CE_TOLERANCE = 0.5
_INITIAL_LOGITS_CACHE = {}


def _initial_loss(layout: VocabLayout):
  """Eval-mode loss of the active gin model at init on a synthetic batch.

  The forward pass is shared between experiments whose model is the same
  (``SpeechTextLM.loss_fn`` is logits, then ``compute_loss_from_config``; the
  smoke experiment runs ``loss_fn`` itself above).
  """
  model = lm.SpeechTextLM(layout)
  batch = input_pipeline.SyntheticSource(
      text_size=layout.text_size, speech_size=layout.speech_size,
      global_batch_size=4, sequence_length=64, max_units=30).global_batch(0)
  key = (model.config, layout)
  if key not in _INITIAL_LOGITS_CACHE:
    params = jax.jit(lambda k: nn.meta.unbox(model.init_params(k)))(jax.random.key(0))
    _INITIAL_LOGITS_CACHE[key] = jax.jit(model.logits)(params, batch)
  loss, aux = losses.compute_loss_from_config(
      _INITIAL_LOGITS_CACHE[key], batch["decoder_target_tokens"],
      batch["decoder_loss_weights"], batch.get("decoder_segment_ids"), layout,
      model.loss_config)
  return model, float(loss), {k: float(v) for k, v in aux.items()}


@pytest.mark.parametrize("path", EXPERIMENTS)
def test_experiment_initial_loss_is_near_log_vocab(path):
  """Every experiment's objective at init: each cross-entropy term is log(V)
  within INITIAL_CE_TOLERANCE, the loss sums the terms its method names, and
  the SLD KL against the paper's target is that of a uniform prediction.
  The paper-size models keep their width and vocabulary but run 2 layers
  (depth barely moves the initial logits; 24 layers would cost minutes)."""
  paper = "librispeech" in path
  layout = PAPER_LAYOUT if paper else SMALL_LAYOUT
  shrink = ("decoder_config.num_layers=2",) if paper else ()
  gin_utils.parse_gin_config([path], REQUIRED + shrink)
  model, loss, aux = _initial_loss(layout)
  log_v = np.log(layout.real_size)
  assert np.isfinite(loss) and aux["num_text_tokens"] > 0 and aux["num_speech_tokens"] > 0
  assert abs(aux["ce_text"] - log_v) < INITIAL_CE_TOLERANCE, (aux, log_v)
  assert abs(aux["ce_speech"] - log_v) < INITIAL_CE_TOLERANCE, (aux, log_v)
  config = model.loss_config
  terms = {"loss_masking": 1, "multimodal_ce": 2, "sld": 2}[config.method]
  assert abs(loss - terms * log_v) < terms * INITIAL_CE_TOLERANCE + (
      config.alpha * aux["kl_speech"] if config.method == "sld" else 0.0), (loss, aux)
  if config.method != "sld":
    assert aux["kl_speech"] == 0.0
    return
  assert aux["kl_speech"] > 0
  np.testing.assert_allclose(
      loss, aux["ce_text"] + aux["ce_speech"] + config.alpha * aux["kl_speech"], rtol=1e-5)
  if config.kl_target == "paper":
    # KL(q' || uniform over K) = log K + sum q' log q', q' = (1 - eps) onehot + eps / K.
    k, eps = layout.speech_size, config.epsilon
    q = np.full(k, eps / k)
    q[0] += 1 - eps
    expected = np.log(k) + np.sum(q * np.log(q))
    # "sequence" (as released) divides the summed KL by sequences, not positions.
    per_sequence = (aux["num_kl_positions"] / aux["num_sequences"]
                    if config.kl_normalization == "sequence" else 1.0)
    assert abs(aux["kl_speech"] - expected * per_sequence) < INITIAL_CE_TOLERANCE * per_sequence, (
        aux, expected, per_sequence)


def test_the_gpu_run_file_switches_the_fast_paths_on():
  """gpu_fast.gin on top of an experiment; on CPU its loss runs with "xla" attention."""
  gin_utils.parse_gin_config(["gin_configs/experiments/librispeech_hubert_sld.gin", GPU_FAST_GIN],
                             list(REQUIRED), finalize=False)
  model = lm.SpeechTextLM(SMALL_LAYOUT)
  assert (model.config.attention_implementation, model.config.dtype,
          model.config.logits_via_embedding_dtype) == ("cudnn_packed", "bfloat16", "bfloat16")
  assert model.config.attention_dropout == 0.0 and model.config.dropout_rate == 0.1
  assert (model.loss_chunk_size, model.loss_backward, model.dropout_rng_impl) == (
      256, "in_forward", "rbg")
  with gin.unlock_config():
    gin.bind_parameter("decoder_config.attention_implementation", "xla")
    gin.bind_parameter("decoder_config.size", "tiny")
  _build_and_check_model(SMALL_LAYOUT, run=True)


def test_gpt2_small_model_file_builds():
  gin.parse_config_files_and_bindings(["gin_configs/models/gpt2_small.gin"], [])
  model, num_params = _build_and_check_model(PAPER_LAYOUT)
  assert (model.config.num_layers, model.config.embed_dim) == (12, 768)
  assert num_params == _gpt2_param_count(12, 768, PAPER_LAYOUT.size), num_params


@pytest.mark.parametrize("path, macro", [
    ("gin_configs/experiments/smoke.gin", "MODEL_DIR"),
    ("gin_configs/experiments/librispeech_wavlm_sld.gin", "WAVLM_UNITS_DIR"),
    ("gin_configs/experiments/librispeech_hubert_loss_masking.gin", "TRAIN_STEPS"),
    ("gin_configs/experiments/librispeech_hubert_multimodal_ce.gin", "INIT_FROM"),
])
def test_a_missing_required_macro_fails_loudly(path, macro):
  bindings = [b for b in REQUIRED if not b.startswith(macro + "=")]
  with pytest.raises(ValueError, match=rf"{macro}.*--gin\.{macro}="):
    gin_utils.parse_gin_config([path], bindings)


def test_gin_flags_are_rewritten_into_bindings():
  argv = ["prog", "--gin_file=a.gin", '--gin.MODEL_DIR="/x"', "--gin.decoder_config.size=1"]
  assert gin_utils.rewrite_gin_args(argv) == [
      "prog", "--gin_file=a.gin", '--gin_bindings=MODEL_DIR = "/x"',
      "--gin_bindings=decoder_config.size = 1"]
  with pytest.raises(ValueError, match="--gin.NAME=VALUE"):
    gin_utils.rewrite_gin_args(["--gin.TRAIN_STEPS"])


def test_a_binding_overrides_the_files_and_the_operative_config_is_written(tmp_path):
  gin_utils.parse_gin_config(["gin_configs/experiments/smoke.gin"],
                             [*REQUIRED, "decoder_config.num_layers = 3"])
  model = lm.SpeechTextLM(SMALL_LAYOUT)
  assert model.config.num_layers == 3 and model.loss_config == losses.LossConfig(
      method="sld", alpha=0.008, epsilon=0.1, temperature=1.0, kl_target="paper")
  path = gin_utils.write_operative_config(str(tmp_path))
  text = open(path).read()
  assert "decoder_config.num_layers = 3" in text
  assert "SpeechTextLM.time_mask_prob = 0.3" in text


def test_train_is_configured_by_the_run_file():
  gin_utils.parse_gin_config(["gin_configs/experiments/smoke.gin"], REQUIRED)
  assert str(gin.query_parameter("trainer.train.model_dir")) == "%MODEL_DIR"
  assert str(gin.query_parameter("trainer.train.total_steps")) == "%TRAIN_STEPS"
  assert gin.query_parameter("%MODEL_DIR") == "/tmp/unused"
  assert gin.query_parameter("%TRAIN_STEPS") == 1000
  assert gin.query_parameter("trainer.train.model").configurable.wrapper is lm.SpeechTextLM
  assert (gin.query_parameter("trainer.train.optimizer").configurable.wrapper
          is optim.make_optimizer)
  assert gin.query_parameter("trainer.train.checkpoint_every") == 20
  schedule = optim.learning_rate_schedule(total_steps=40)
  assert float(schedule(0)) == 0.0 and float(schedule(4)) == pytest.approx(1e-3)  # warmup
