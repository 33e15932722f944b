"""The Longformer paper's conversions of pretrained checkpoints: RoBERTa to Longformer, BART to LED.

Both work on Hugging Face state dicts and config.json, so the output
directory is a Hugging Face checkpoint that longjax and transformers both
load. The long position table is the source's learned positions copied
end to end (the paper found this far better than a random start), and each
attention layer's global projections start as copies of its local ones.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np

from longjax.hf import checkpoint_files, configs

_ROBERTA_HEADS = ("Model", "ForMaskedLM", "ForSequenceClassification", "ForQuestionAnswering",
                  "ForMultipleChoice", "ForTokenClassification")
_BART_HEADS = ("Model", "ForConditionalGeneration", "ForSequenceClassification", "ForQuestionAnswering")


def tile_rows(table: np.ndarray, rows: int, *, keep: int = 0) -> np.ndarray:
    """A `[rows + keep, dim]` table: `table[:keep]`, then `table[keep:]` repeated end to end up to `rows` rows.

    Args:
      table: `[n, dim]` learned positions.
      rows: usable positions of the result.
      keep: leading rows copied once and not tiled (RoBERTa's two offset rows).
    """
    if rows <= 0:
        raise ValueError(f"rows must be positive, got {rows}")
    source = table[keep:]
    if not len(source):
        raise ValueError(f"a table of {len(table)} rows has nothing to tile after its first {keep}")
    repeats = -(-rows // len(source))
    return np.concatenate([table[:keep], np.tile(source, (repeats, 1))[:rows]], axis=0)


def _read_source(src: pathlib.Path, model_type: str, attention_window, **positions) -> tuple[dict, str]:
    """The source's config.json (and its path, for messages), after checking the conversion's arguments."""
    hf_config = configs.read_config_json(src)
    source = f"{src}/config.json"
    if hf_config.get("model_type") != model_type:
        raise ValueError(f"{source}: model_type is {hf_config.get('model_type')!r}, expected {model_type!r}")
    if not isinstance(attention_window, int) or attention_window <= 0 or attention_window % 2:
        raise ValueError(
            f"attention_window must be a positive even int (Hugging Face's full window, both sides), "
            f"got {attention_window!r}"
        )
    for name, value in positions.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return hf_config, source


def _rename_architecture(hf_config: dict, source: str, old: str, new: str, heads: tuple[str, ...]) -> list[str]:
    names = hf_config.get("architectures") or [f"{old}Model"]
    renamed = []
    for name in names:
        suffix = name[len(old):] if name.startswith(old) else None
        if suffix not in heads:
            raise ValueError(f"{source}: architecture {name!r} has no {new} counterpart; expected {old} + one of {heads}")
        renamed.append(new + suffix)
    return renamed


def _copy_tokenizer(src: pathlib.Path, out: pathlib.Path, model_max_length: int) -> None:
    for name in checkpoint_files.TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    config_path = out / "tokenizer_config.json"
    if config_path.is_file():
        tokenizer_config = json.loads(config_path.read_text())
        tokenizer_config["model_max_length"] = model_max_length
        config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _write(out: pathlib.Path, hf_config: dict, tensors: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_files.write_checkpoint_tensors(out, tensors)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")


def roberta_to_longformer(
    src: str | os.PathLike, out: str | os.PathLike, *, max_positions: int = 4096, attention_window: int = 512
) -> pathlib.Path:
    """Converts a RoBERTa checkpoint directory into a Longformer one.

    Args:
      src: Hugging Face RoBERTa directory (any of RoBERTa's heads).
      out: the Longformer directory to write.
      max_positions: usable positions; the table keeps RoBERTa's
        `pad_token_id + 1` offset rows (copied from the source), so 4096
        gives 4098 rows, as in allenai/longformer-base-4096.
      attention_window: Hugging Face's full window per layer (even; each
        token sees half of it on each side).

    Returns:
      The output directory.
    """
    src, out = pathlib.Path(src), pathlib.Path(out)
    hf_config, source = _read_source(src, "roberta", attention_window, max_positions=max_positions)
    architectures = _rename_architecture(hf_config, source, "Roberta", "Longformer", _ROBERTA_HEADS)
    tensors, _ = checkpoint_files.read_checkpoint_tensors(src)
    offset = hf_config["pad_token_id"] + 1
    converted = {}
    for name, tensor in tensors.items():
        name = "longformer." + name[len("roberta."):] if name.startswith("roberta.") else name
        if name.endswith("embeddings.position_ids"):
            continue  # a buffer of arange(max_positions), rebuilt by transformers
        if name.endswith("embeddings.position_embeddings.weight"):
            tensor = tile_rows(tensor, max_positions, keep=offset)
        converted[name] = tensor
        for local in ("query", "key", "value"):
            marker = f".attention.self.{local}."
            if marker in name:
                converted[name.replace(marker, f".attention.self.{local}_global.")] = tensor.copy()
    layers = hf_config["num_hidden_layers"]
    hf_config = dict(
        hf_config, model_type="longformer", architectures=architectures, attention_window=[attention_window] * layers,
        max_position_embeddings=max_positions + offset,
    )
    hf_config.setdefault("sep_token_id", hf_config.get("eos_token_id", 2))
    _write(out, hf_config, converted)
    _copy_tokenizer(src, out, max_positions)
    return out


def bart_to_led(
    src: str | os.PathLike, out: str | os.PathLike, *, max_encoder_positions: int = 16384,
    attention_window: int = 1024,
) -> pathlib.Path:
    """Converts a BART checkpoint directory into an LED (Longformer-Encoder-Decoder) one.

    The encoder's self-attention becomes Longformer attention (q/k/v_proj to
    longformer_self_attn.query/key/value plus their global copies, out_proj to
    output); the encoder positions are BART's tiled to `max_encoder_positions`
    rows without BART's two offset rows, which LED drops; the decoder keeps
    BART's positions (also without the offset rows).

    Args:
      src: Hugging Face BART directory.
      out: the LED directory to write.
      max_encoder_positions: encoder positions of the result.
      attention_window: Hugging Face's full window of every encoder layer (even).

    Returns:
      The output directory.
    """
    src, out = pathlib.Path(src), pathlib.Path(out)
    hf_config, source = _read_source(src, "bart", attention_window, max_encoder_positions=max_encoder_positions)
    for flag in ("scale_embedding", "normalize_before", "add_final_layer_norm"):
        if hf_config.get(flag):
            raise ValueError(f"{source}: {flag}=true has no LED counterpart (LED follows bart-base/large)")
    architectures = _rename_architecture(hf_config, source, "Bart", "LED", _BART_HEADS)
    tensors, _ = checkpoint_files.read_checkpoint_tensors(src)
    bart_offset = 2  # BartLearnedPositionalEmbedding's fixed offset
    converted = {}
    for name, tensor in tensors.items():
        name = "led." + name[len("model."):] if name.startswith("model.") else name
        if name.endswith("encoder.embed_positions.weight"):
            tensor = tile_rows(tensor[bart_offset:], max_encoder_positions)
        elif name.endswith("decoder.embed_positions.weight"):
            tensor = tensor[bart_offset:]
        if ".encoder.layers." in f".{name}" and ".self_attn." in name:
            for bart, led in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
                marker = f".self_attn.{bart}."
                if marker in name:
                    local = name.replace(marker, f".self_attn.longformer_self_attn.{led}.")
                    converted[local] = tensor
                    converted[local.replace(f".{led}.", f".{led}_global.")] = tensor.copy()
                    break
            else:
                converted[name.replace(".self_attn.out_proj.", ".self_attn.output.")] = tensor
            continue
        converted[name] = tensor
    max_decoder = hf_config["max_position_embeddings"]
    hf_config = {k: v for k, v in hf_config.items() if k not in ("max_position_embeddings", "scale_embedding")}
    hf_config.update(
        model_type="led", architectures=architectures,
        attention_window=[attention_window] * hf_config["encoder_layers"],
        max_encoder_position_embeddings=max_encoder_positions, max_decoder_position_embeddings=max_decoder,
    )
    _write(out, hf_config, converted)
    _copy_tokenizer(src, out, max_encoder_positions)
    return out
