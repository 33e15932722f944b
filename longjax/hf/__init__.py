"""Hugging Face checkpoints in longjax: read and write their files, load RoBERTa/Longformer, convert, tokenize."""

from longjax.hf.checkpoint_files import read_checkpoint_tensors, write_checkpoint_tensors
from longjax.hf.pretrained import Pretrained, from_pretrained, save_pretrained
from longjax.hf.encoder_decoder_pretrained import EncoderDecoderPretrained  # after pretrained, which it uses
from longjax.hf.safetensors_io import read_safetensors, write_safetensors
from longjax.hf.torch_pickle import read_torch_state_dict

__all__ = [
    "EncoderDecoderPretrained",
    "Pretrained",
    "from_pretrained",
    "read_checkpoint_tensors",
    "read_safetensors",
    "read_torch_state_dict",
    "save_pretrained",
    "write_checkpoint_tensors",
    "write_safetensors",
]
