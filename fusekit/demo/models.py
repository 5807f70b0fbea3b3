"""Build small, fully local Llama-architecture checkpoints for demos, tests and benchmarks.

The first name is a randomly initialised "base" model; every further name is a "fine-tune" of it:
the base plus a seeded low-rank-plus-noise delta on every matrix and a small change to every norm,
so the variants differ from the base and from each other, with sign conflicts between them.

Only torch and the standard library are used, so this runs on the plain install. The checkpoint
layout (config.json, safetensors shards and index, tokenizer files) is the one transformers reads.
Weights are generated in blocks of rows and streamed straight into the safetensors files, so peak
memory stays at a few tens of MB above torch's own, even for billion-parameter models.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fusekit.demo.tokenizer import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    SPECIAL_TOKENS,
    TOKENIZER_VOCAB_SIZE,
    write_byte_tokenizer,
    write_demo_json,
)
from fusekit.io.layout import (
    INDEX_FILE,
    TensorSpec,
    encode_header,
    plan_shards,
    shard_file_names,
    shard_index,
    tensor_bytes,
)

MAX_POSITION_EMBEDDINGS = 256
RMS_NORM_EPS = 1e-6
ROPE_THETA = 10000.0

_INIT_STD = 0.02
_DELTA_RANK = 8
_LOW_RANK_STD = 0.12 * _INIT_STD  # the delta's low-rank part, ~12% of the base's std
_NOISE_STD = 0.06 * _INIT_STD  # its dense noise part, ~6%: ~13% in all
_NORM_DELTA_STD = 0.03
_BLOCK_ELEMENTS = 1 << 22  # rows are generated and written this many elements at a time

_CONFIG_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


@dataclass(frozen=True)
class _DemoConfig:
    """Sizes of a demo Llama model.

    Attributes:
        hidden_size: Width of the residual stream.
        num_layers: Number of decoder layers.
        intermediate_size: Width of the SwiGLU MLP.
        num_attention_heads: Number of query heads.
        num_key_value_heads: Number of key/value heads (grouped-query attention).
        vocab_size: Rows of the embedding and LM head.
        tie_word_embeddings: Whether the LM head reuses the embedding (no lm_head tensor).
    """

    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads


def build_demo_models(
    out_dir: Path,
    *,
    names: Sequence[str] = ("base", "math", "code"),
    hidden_size: int = 64,
    num_layers: int = 4,
    intermediate_size: int | None = None,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool = False,
    max_shard_bytes: int | None = None,
    with_tokenizer: bool = True,
    seed: int = 0,
) -> dict[str, Path]:
    """Write a base model and its fine-tuned variants as Hugging Face Llama checkpoints.

    Args:
        out_dir: Parent folder; one sub-folder per name is created (or refreshed) in it.
        names: Model names; ``names[0]`` is the base, the others are fine-tunes of it.
        hidden_size: Width of the residual stream.
        num_layers: Number of decoder layers.
        intermediate_size: MLP width; by default 8/3 of ``hidden_size`` rounded up to 32.
        num_attention_heads: Number of query heads; must divide ``hidden_size``.
        num_key_value_heads: Number of key/value heads; must divide ``num_attention_heads``.
        vocab_size: Embedding rows; by default :data:`TOKENIZER_VOCAB_SIZE`.
        dtype: Stored dtype: float32, bfloat16 or float16.
        tie_word_embeddings: Reuse the embedding as LM head and store no ``lm_head.weight``.
        max_shard_bytes: Split the weights into shards of at most this size (a single larger
            tensor gets a shard of its own) when the model is larger; ``None`` never shards.
        with_tokenizer: Also write the built-in byte-level tokenizer.
        seed: Seed of every random draw; the same arguments always give the same bytes.

    Returns:
        Model name -> its folder, in the order of ``names``.

    Raises:
        ValueError: If a size, name or dtype is invalid, or ``vocab_size`` is smaller than the
            tokenizer's vocabulary while ``with_tokenizer`` is set.

    Example:
        >>> folders = build_demo_models(Path("demo-out/models"), hidden_size=32)  # doctest: +SKIP
        >>> sorted(folders)  # doctest: +SKIP
        ['base', 'code', 'math']
    """
    inter = _default_intermediate_size(hidden_size) if intermediate_size is None else intermediate_size
    config = _DemoConfig(hidden_size, num_layers, inter, num_attention_heads, num_key_value_heads,
                         TOKENIZER_VOCAB_SIZE if vocab_size is None else vocab_size, tie_word_embeddings)
    _validate(config, names, dtype, max_shard_bytes, with_tokenizer)
    folders = {name: Path(out_dir) / name for name in names}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_weights(folder)
        write_demo_json(folder / "config.json", _model_config(config, dtype))
        write_demo_json(folder / "generation_config.json", _generation_config())
        if with_tokenizer:
            write_byte_tokenizer(folder, model_max_length=MAX_POSITION_EMBEDDINGS)
    _write_weights(list(folders.values()), list(names), config, dtype, max_shard_bytes, seed)
    return folders


def _default_intermediate_size(hidden_size: int) -> int:
    return -(-8 * hidden_size // (3 * 32)) * 32


def _validate(
    config: _DemoConfig,
    names: Sequence[str],
    dtype: torch.dtype,
    max_shard_bytes: int | None,
    with_tokenizer: bool,
) -> None:
    """Raise ValueError on arguments that would give a broken or unloadable checkpoint."""
    sizes = {
        "hidden_size": config.hidden_size,
        "num_layers": config.num_layers,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
    }
    for key, value in sizes.items():
        if value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value}")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"hidden_size {config.hidden_size} is not divisible by "
            f"num_attention_heads {config.num_attention_heads}"
        )
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads {config.num_attention_heads} is not divisible by "
            f"num_key_value_heads {config.num_key_value_heads}"
        )
    _validate_vocab(config.vocab_size, with_tokenizer)
    _validate_names(names)
    if dtype not in _CONFIG_DTYPES:
        raise ValueError(f"dtype must be one of {list(_CONFIG_DTYPES.values())}, got {dtype}")
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")


def _validate_vocab(vocab_size: int, with_tokenizer: bool) -> None:
    if vocab_size < len(SPECIAL_TOKENS):
        # the config names bos/eos/pad ids, which must be valid rows of the embedding
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS)}, got {vocab_size}")
    if with_tokenizer and vocab_size < TOKENIZER_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the built-in tokenizer's vocabulary "
            f"({TOKENIZER_VOCAB_SIZE}); raise it or pass with_tokenizer=False"
        )


def _validate_names(names: Sequence[str]) -> None:
    if isinstance(names, str) or not names:
        raise ValueError("names must be a non-empty sequence of model names")
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {list(names)}")
    for name in names:
        if not name or name in {".", ".."} or "/" in name or "\\" in name:
            raise ValueError(f"model name {name!r} is not a plain folder name")


def _remove_stale_weights(folder: Path) -> None:
    """Delete weight files of an earlier build, which could shadow or mix with the new ones."""
    stale = [*folder.glob("model-*-of-*.safetensors"), folder / "model.safetensors.index.json"]
    stale.append(folder / "model.safetensors")
    for path in stale:
        path.unlink(missing_ok=True)


# --- config files -------------------------------------------------------------------------------


def _model_config(config: _DemoConfig, dtype: torch.dtype) -> dict[str, object]:
    """The config.json transformers 5 writes for a LlamaForCausalLM of these sizes."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
        "dtype": _CONFIG_DTYPES[dtype],
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "initializer_range": _INIT_STD,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "mlp_bias": False,
        "num_attention_heads": config.num_attention_heads,
        "num_hidden_layers": config.num_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_parameters": {"rope_theta": ROPE_THETA, "rope_type": "default"},
        "tie_word_embeddings": config.tie_word_embeddings,
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }


def _generation_config() -> dict[str, object]:
    return {
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
    }


# --- tensor layout ------------------------------------------------------------------------------


def _tensor_specs(config: _DemoConfig, dtype: torch.dtype) -> list[TensorSpec]:
    """Every tensor of LlamaForCausalLM's state dict, in module order."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    specs = [TensorSpec("model.embed_tokens.weight", (config.vocab_size, hidden), dtype)]
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}"
        specs += [
            TensorSpec(f"{prefix}.input_layernorm.weight", (hidden,), dtype),
            TensorSpec(f"{prefix}.self_attn.q_proj.weight", (q_rows, hidden), dtype),
            TensorSpec(f"{prefix}.self_attn.k_proj.weight", (kv_rows, hidden), dtype),
            TensorSpec(f"{prefix}.self_attn.v_proj.weight", (kv_rows, hidden), dtype),
            TensorSpec(f"{prefix}.self_attn.o_proj.weight", (hidden, q_rows), dtype),
            TensorSpec(f"{prefix}.post_attention_layernorm.weight", (hidden,), dtype),
            TensorSpec(f"{prefix}.mlp.gate_proj.weight", (inter, hidden), dtype),
            TensorSpec(f"{prefix}.mlp.up_proj.weight", (inter, hidden), dtype),
            TensorSpec(f"{prefix}.mlp.down_proj.weight", (hidden, inter), dtype),
        ]
    specs.append(TensorSpec("model.norm.weight", (hidden,), dtype))
    if not config.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (config.vocab_size, hidden), dtype))
    return specs


# --- weight generation --------------------------------------------------------------------------


def _generator(seed: int, *parts: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a path of names, stable across processes."""
    digest = hashlib.sha256("/".join([str(seed), *parts]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _row_blocks(spec: TensorSpec) -> Iterator[tuple[int, int]]:
    rows, cols = spec.shape
    step = max(1, _BLOCK_ELEMENTS // cols)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _norm_weights(spec: TensorSpec, variants: Sequence[str], seed: int) -> list[torch.Tensor]:
    """Ones for the base, ones plus a small seeded perturbation for each fine-tune."""
    tensors = [torch.ones(spec.shape)]
    for variant in variants:
        noise = torch.randn(spec.shape, generator=_generator(seed, "delta", variant, spec.name))
        tensors.append(noise.mul_(_NORM_DELTA_STD).add_(1.0))
    return tensors


def _matrix_blocks(
    spec: TensorSpec, variants: Sequence[str], seed: int
) -> Iterator[list[torch.Tensor]]:
    """Yield, one block of rows at a time, the base matrix and each fine-tune of it.

    A fine-tune's delta is ``A @ B`` of rank 8 plus dense noise, drawn from its own generator;
    the low-rank factors are drawn whole up front (they are small), the noise block by block.
    """
    rows, cols = spec.shape
    rank = min(_DELTA_RANK, rows, cols)
    base_gen = _generator(seed, "base", spec.name)
    deltas = []
    for variant in variants:
        gen = _generator(seed, "delta", variant, spec.name)
        left = torch.randn(rows, rank, generator=gen)
        right = torch.randn(rank, cols, generator=gen).mul_(_LOW_RANK_STD / math.sqrt(rank))
        deltas.append((gen, left, right))
    for start, stop in _row_blocks(spec):
        base = torch.randn(stop - start, cols, generator=base_gen).mul_(_INIT_STD)
        block = [base]
        for gen, left, right in deltas:
            tuned = torch.addmm(base, left[start:stop], right)
            noise = torch.randn(stop - start, cols, generator=gen)
            block.append(tuned.add_(noise, alpha=_NOISE_STD))
        yield block


def _tensor_blocks(
    spec: TensorSpec, variants: Sequence[str], seed: int
) -> Iterator[list[torch.Tensor]]:
    """Blocks of one tensor for every model, base first; 1-D norms come as a single block."""
    if len(spec.shape) == 1:
        yield _norm_weights(spec, variants, seed)
    else:
        yield from _matrix_blocks(spec, variants, seed)


# --- safetensors writing ------------------------------------------------------------------------


def _write_shard(
    paths: list[Path],
    specs: list[TensorSpec],
    variants: Sequence[str],
    dtype: torch.dtype,
    seed: int,
) -> None:
    """Write the same shard of every model at once, so each base block is drawn only once."""
    header, _ = encode_header(specs)
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(path.open("wb")) for path in paths]
        for handle in handles:
            handle.write(header)
        for spec in specs:
            for block in _tensor_blocks(spec, variants, seed):
                for handle, tensor in zip(handles, block, strict=True):
                    handle.write(tensor_bytes(tensor.to(dtype).contiguous()))


def _write_weights(
    folders: list[Path],
    names: list[str],
    config: _DemoConfig,
    dtype: torch.dtype,
    max_shard_bytes: int | None,
    seed: int,
) -> None:
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this host is big-endian")
    shards = plan_shards(_tensor_specs(config, dtype), max_shard_bytes)
    file_names = shard_file_names(len(shards))
    for file_name, specs in zip(file_names, shards, strict=True):
        paths = [folder / file_name for folder in folders]
        _write_shard(paths, specs, names[1:], dtype, seed)
    if len(shards) > 1:
        index = shard_index(shards, file_names)
        for folder in folders:
            write_demo_json(folder / INDEX_FILE, index)
