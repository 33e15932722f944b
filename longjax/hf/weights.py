"""Hugging Face (PyTorch) weight names and layouts <-> longjax parameter trees, both ways.

PyTorch's Linear stores `[out, in]`; Flax's Dense kernel is `[in, out]`, and
longjax's attention projections are DenseGeneral kernels `[d_model, heads,
head_dim]` (query/key/value) and `[heads, head_dim, d_model]` (output), so
the mapping transposes and reshapes; LayerNorm weight/bias are scale/bias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from longjax.hf.configs import Architecture
from longjax.models.config import TransformerConfig

# Buffers and tied copies that a checkpoint may hold but that are no parameters of their own.
_DERIVED = ("embeddings.position_ids", "lm_head.decoder.weight", "lm_head.decoder.bias")
# Weight names of the task heads, which never carry the base model's prefix.
_HEAD_NAMES = ("lm_head.", "classifier.", "qa_outputs.")


@dataclasses.dataclass(frozen=True)
class _Module:
    """One PyTorch module (`<hf>.weight`, `<hf>.bias`) and the longjax parameters it becomes."""

    hf: str  # without the base model's prefix ('roberta.'/'longformer.')
    path: tuple[str, ...]
    kind: str  # 'linear', 'qkv', 'out', 'layer_norm', 'embed', 'bias'
    part: str  # 'encoder', 'pooler' or 'head': only the pooler and head may be freshly initialised

    def name(self, arch: Architecture, suffix: str) -> str:
        """The Hugging Face name of `<module>.<suffix>` in a checkpoint of `arch`."""
        prefix = arch.prefix if self.part != "head" else ""
        return f"{prefix}{self.hf}.{suffix}" if suffix else f"{prefix}{self.hf}"


def _modules(config: TransformerConfig, arch: Architecture) -> list[_Module]:
    p = ""
    enc = ("encoder",)
    mods = [
        _Module(f"{p}embeddings.word_embeddings", enc + ("embed",), "embed", "encoder"),
        _Module(f"{p}embeddings.position_embeddings", enc + ("position_embed",), "embed", "encoder"),
        _Module(f"{p}embeddings.LayerNorm", enc + ("embed_norm",), "layer_norm", "encoder"),
    ]
    if config.type_vocab_size:
        mods.append(_Module(f"{p}embeddings.token_type_embeddings", enc + ("token_type_embed",), "embed", "encoder"))
    projections = [("query", "query"), ("key", "key"), ("value", "value")]
    if arch.family == "longformer":
        projections += [("query_global", "global_query"), ("key_global", "global_key"), ("value_global", "global_value")]
    for i in range(config.num_layers):
        hf, layer = f"{p}encoder.layer.{i}", enc + ("transformer", f"layer_{i}")
        mods += [_Module(f"{hf}.attention.self.{a}", layer + ("attention", b), "qkv", "encoder") for a, b in projections]
        mods += [
            _Module(f"{hf}.attention.output.dense", layer + ("attention", "out"), "out", "encoder"),
            _Module(f"{hf}.attention.output.LayerNorm", layer + ("attention_norm",), "layer_norm", "encoder"),
            _Module(f"{hf}.intermediate.dense", layer + ("mlp", "wi"), "linear", "encoder"),
            _Module(f"{hf}.output.dense", layer + ("mlp", "wo"), "linear", "encoder"),
            _Module(f"{hf}.output.LayerNorm", layer + ("mlp_norm",), "layer_norm", "encoder"),
        ]
    if arch.pooler:
        mods.append(_Module(f"{p}pooler.dense", ("pooler", "dense"), "linear", "pooler"))
    head = {
        None: [],
        "masked_lm": [
            _Module("lm_head.dense", ("head", "dense"), "linear", "head"),
            _Module("lm_head.layer_norm", ("head", "layer_norm"), "layer_norm", "head"),
            _Module("lm_head.bias", ("head",), "bias", "head"),
        ],
        "classification": [
            _Module("classifier.dense", ("head", "dense"), "linear", "head"),
            _Module("classifier.out_proj", ("head", "out_proj"), "linear", "head"),
        ],
        "question_answering": [_Module("qa_outputs", ("head", "qa_outputs"), "linear", "head")],
        "multiple_choice": [_Module("classifier", ("head", "classifier"), "linear", "head")],
    }[arch.head]
    return mods + head


def _to_longjax(kind: str, suffix: str, array: np.ndarray, config: TransformerConfig) -> tuple[str, np.ndarray]:
    """(longjax leaf name, value) of one PyTorch tensor."""
    heads, head_dim, d = config.num_heads, config.head_dim, config.d_model
    if kind == "embed":
        return "embedding", array
    if kind == "layer_norm":
        return ("scale" if suffix == "weight" else "bias"), array
    if kind == "bias":
        return "bias", array
    if suffix == "bias":
        return "bias", array.reshape(heads, head_dim) if kind == "qkv" else array
    if kind == "qkv":
        return "kernel", array.T.reshape(d, heads, head_dim)
    if kind == "out":
        return "kernel", array.T.reshape(heads, head_dim, d)
    return "kernel", array.T


def _to_hf(kind: str, leaf: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """(PyTorch suffix, value) of one longjax leaf."""
    if kind == "embed":
        return "weight", array
    if kind == "layer_norm":
        return ("weight" if leaf == "scale" else "bias"), array
    if kind == "bias":
        return "", array
    if leaf == "bias":
        return "bias", array.reshape(-1)
    if kind == "qkv":
        return "weight", array.reshape(array.shape[0], -1).T
    if kind == "out":
        return "weight", array.reshape(-1, array.shape[-1]).T
    return "weight", array.T


def _suffixes(kind: str) -> tuple[str, ...]:
    return ("",) if kind == "bias" else ("weight",) if kind == "embed" else ("weight", "bias")


@dataclasses.dataclass(frozen=True)
class LoadedWeights:
    """Parameters read from a checkpoint and what it did not provide or use."""

    params: dict
    missing: tuple[str, ...]  # Hugging Face names absent from the checkpoint (pooler/head only)
    unused: tuple[str, ...]  # checkpoint names that no parameter took


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def params_from_hf(
    tensors: Mapping[str, np.ndarray], config: TransformerConfig, arch: Architecture, *,
    expected: Mapping | None, source: str,
) -> LoadedWeights:
    """longjax parameters of `arch` from a Hugging Face state dict.

    The base model's weights are found with or without the architecture's
    prefix ('roberta.'/'longformer.'), as transformers does when a bare
    model's checkpoint is loaded under a head or the reverse.

    Args:
      tensors: Hugging Face name -> array.
      config, arch: the model the parameters are for.
      expected: the parameter shapes (`jax.eval_shape` of init) to check
        against; None skips the check.
      source: the file read, for error messages.

    Raises:
      ValueError naming the file and the weight when an encoder weight is
      missing or any weight's shape differs from the model's.
    """
    # A bare model's checkpoint loads under a head and the reverse, as in transformers.
    family = f"{arch.family}."
    has_prefix = any(n.startswith(family) for n in tensors)
    names = {
        (arch.prefix + n[len(family):] if n.startswith(family) else n) if has_prefix else
        (arch.prefix + n if not n.startswith(_HEAD_NAMES) else n): t
        for n, t in tensors.items()
    }
    params: dict = {}
    used, missing = set(), []
    for mod in _modules(config, arch):
        for suffix in _suffixes(mod.kind):
            hf_name = mod.name(arch, suffix)
            if hf_name not in names:
                if mod.part == "encoder":
                    raise ValueError(f"{source}: weight {hf_name!r} is missing (needed by {arch.name})")
                missing.append(hf_name)
                continue
            leaf, value = _to_longjax(mod.kind, suffix, np.asarray(names[hf_name]), config)
            path = mod.path + (leaf,)
            if expected is not None:
                want = tuple(_get(expected, path).shape)
                if tuple(value.shape) != want:
                    raise ValueError(
                        f"{source}: weight {hf_name!r} has shape {list(names[hf_name].shape)}, which gives "
                        f"{list(value.shape)} for {'/'.join(path)}; the model built from config.json needs {list(want)}"
                    )
            _set(params, path, value)
            used.add(hf_name)
    embedding = names.get(f"{arch.prefix}embeddings.word_embeddings.weight")
    for tied in ("lm_head.decoder.weight",):
        if tied in names and arch.head == "masked_lm" and not np.array_equal(names[tied], embedding):
            raise ValueError(f"{source}: {tied!r} differs from the word embeddings; untied decoders are not supported")
    unused = tuple(sorted(n for n in names if n not in used and not n.endswith(_DERIVED)))
    return LoadedWeights(params, tuple(missing), unused)


def params_to_hf(params: Mapping, config: TransformerConfig, arch: Architecture) -> dict[str, np.ndarray]:
    """The Hugging Face state dict of longjax parameters (inverse of `params_from_hf`).

    The tied masked-LM decoder is not written (transformers ties it on load).
    """
    out = {}
    for mod in _modules(config, arch):
        node = _get(params, mod.path)
        leaves = {"bias": node["bias"]} if mod.kind == "bias" else node
        for leaf, value in leaves.items():
            suffix, array = _to_hf(mod.kind, leaf, np.asarray(value))
            out[mod.name(arch, suffix)] = np.ascontiguousarray(array)
    return out
