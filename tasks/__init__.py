"""seqio tasks of sld_jax; importing this package registers them.

  import tasks
  batches = tasks.get_dataset("sld_embedded_digits_whisper", "train",
                              sequence_length=256, batch_size=32)
  layout = tasks.get_layout("sld_embedded_digits_whisper")
"""

from tasks.batches import get_dataset
from tasks.registry import DEFAULT_TASK
from tasks.registry import EMBEDDED_TASKS
from tasks.registry import LIBRISPEECH_GPT2_TASK
from tasks.registry import LIBRISPEECH_TASK
from tasks.registry import ensure_prepared
from tasks.registry import get_layout
from tasks.registry import gpt2_tokenizer_dir
from tasks.registry import prepared_dir
from tasks.registry import register_librispeech_tasks
from tasks.registry import register_task
