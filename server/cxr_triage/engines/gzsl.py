"""CXR-ML-GZSL at serving time, torch-free: numpy, ONNX Runtime and ``tokenizers`` only.

Loads a version folder written by ``cxr_triage.train.gzsl.export`` (``image_encoder.onnx``,
``text_encoder.onnx``, ``tokenizer.json``, ``label_latents.npy``, ``metadata.json``). A
finding's score for an image is the cosine similarity of their latents (both unit vectors), in
[-1, 1]; a finding added at run time gets its latent from :meth:`GzslEngine.encode_text`
(name and optional description through the frozen text encoder and the trained projection),
exactly as the labels the model was trained with got theirs.

The server calls, in order: ``GzslEngine(version_dir)`` once (in ``setup``), then per batch
``encode_images(batch)`` with the NCHW float32 tensor ``imaging.to_batch`` makes for
``engine.input_spec``, then ``scores(latents, label_latents)`` against the stored
``engine.label_latents`` plus any run-time findings' latents stacked under them.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from cxr_triage.config import Backend
from cxr_triage.engines.onnx import OnnxEngine, choose_providers
from cxr_triage.errors import RepositoryError
from cxr_triage.repository.models import METADATA_FILE, InputSpec

MODEL_TYPE = "gzsl"


def label_text(name: str, description: str | None = None) -> str:
    """The sentence a finding is embedded as (training and serving share this function): its
    name in words (``Pleural_Thickening`` -> ``pleural thickening``), then ``: description``."""
    words = " ".join(name.replace("_", " ").split()).lower()
    return f"{words}: {description.strip()}" if description and description.strip() else words


def to_probability(cosines: np.ndarray) -> np.ndarray:
    """Cosine similarities in [-1, 1] onto the 0-1 scale results report: (1 + cos) / 2.

    Monotone, so rankings and AUROC are the cosines'; not a calibrated probability, which is
    why operating points for these scores are chosen on labelled data.
    """
    return np.clip((1.0 + np.asarray(cosines, dtype=np.float32)) / 2.0, 0.0, 1.0)


def scores(latents: np.ndarray, label_latents: np.ndarray) -> np.ndarray:
    """Cosine similarities (N, L) of image latents (N, d) and label latents (L, d), float32.

    Rows are re-normalised here, so unnormalised inputs give cosines too.
    """
    a = np.asarray(latents, dtype=np.float32)
    b = np.asarray(label_latents, dtype=np.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"latents {a.shape} and label latents {b.shape} must be (N, d) and (L, d)")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a @ b.T).astype(np.float32)


class GzslEngine:
    """The two ONNX towers, the tokenizer and the stored label latents of one version.

    Raises (constructor):
        RepositoryError: not a gzsl version folder, a missing file, or a file whose SHA-256 is
        not the one metadata.json records (``verify``).
    """

    def __init__(
        self,
        version_dir: Path,
        preference: Backend = "auto",
        intra_op_threads: int = 0,
        verify: bool = True,
        image: bool = True,
    ) -> None:
        """``image=False``: only the text tower (what adding a finding needs), no image engine."""
        self.path = Path(version_dir)
        meta_path = self.path / METADATA_FILE
        if not meta_path.is_file():
            raise RepositoryError(
                f"{meta_path} not found; export a GZSL version with `cxr-triage gzsl register`"
            )
        self.metadata: dict[str, Any] = json.loads(meta_path.read_text())
        spec = self.metadata.get("gzsl")
        if self.metadata.get("model_type") != MODEL_TYPE or not isinstance(spec, dict):
            raise RepositoryError(
                f"{meta_path} is not a GZSL version (model_type {self.metadata.get('model_type')!r})"
            )
        if verify:  # the files this runtime reads (weights.pt is for fine-tuning, never served)
            served = (
                spec["image_engine"]["file"],
                spec["text_engine"]["file"],
                spec["tokenizer"],
                spec["label_latents"],
            )
            self._verify(self.metadata.get("files", {}), served)
        self.labels: tuple[str, ...] = tuple(spec["labels"])
        self.unseen: tuple[str, ...] = tuple(spec["unseen"])
        self.seen: tuple[str, ...] = tuple(spec["seen"])
        self.input_spec = InputSpec.model_validate(spec["input"])
        self.max_length = int(spec["text_engine"]["max_length"])
        self.label_latents = np.load(self.path / spec["label_latents"]).astype(np.float32)
        if self.label_latents.shape[0] != len(self.labels):
            raise RepositoryError(
                f"{self.path.name}: {spec['label_latents']} has {self.label_latents.shape[0]} rows "
                f"for {len(self.labels)} labels"
            )
        self._image = (
            OnnxEngine(self.path / spec["image_engine"]["file"], preference, intra_op_threads)
            if image
            else None
        )
        self._text = _session(self.path / spec["text_engine"]["file"], preference, intra_op_threads)
        self._tokenizer = Tokenizer.from_file(str(self.path / spec["tokenizer"]))
        self.backend = self._image.backend if self._image is not None else "text-only"

    @property
    def latent_dim(self) -> int:
        return int(self.label_latents.shape[1])

    def encode_images(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, S, S) float32 model input -> (N, d) unit-length image latents."""
        if self._image is None:
            raise RuntimeError("this GzslEngine was loaded without its image tower (image=False)")
        return self._image.run(np.ascontiguousarray(batch, dtype=np.float32))

    def encode_text(
        self, names: Sequence[str], descriptions: Sequence[str | None] | None = None
    ) -> np.ndarray:
        """Latents (len(names), d), unit length, of findings given by name (and description).

        Raises:
            ValueError: no names, an empty name, or descriptions not one per name.
        """
        if not names or any(not n or not n.strip() for n in names):
            raise ValueError("give at least one finding name, none of them empty")
        described = list(descriptions) if descriptions is not None else [None] * len(names)
        if len(described) != len(names):
            raise ValueError(
                f"{len(described)} descriptions for {len(names)} names; give one per name (or None)"
            )
        texts = [label_text(n, d) for n, d in zip(names, described, strict=True)]
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int64)
        (out,) = self._text.run(None, {"input_ids": ids, "attention_mask": mask})
        return np.asarray(out, dtype=np.float32)

    @staticmethod
    def scores(latents: np.ndarray, label_latents: np.ndarray) -> np.ndarray:
        """Cosine similarities (N, L); see :func:`scores`."""
        return scores(latents, label_latents)

    def score_images(self, batch: np.ndarray, label_latents: np.ndarray | None = None) -> np.ndarray:
        """Scores (N, L) of a batch against ``label_latents`` (default: the version's labels)."""
        return scores(
            self.encode_images(batch), self.label_latents if label_latents is None else label_latents
        )

    def _verify(self, files: dict[str, str], names: Sequence[str]) -> None:
        import hashlib

        unlisted = [n for n in names if n not in files]
        if unlisted:
            raise RepositoryError(
                f"{self.path}/{METADATA_FILE} lists no SHA-256 for {unlisted}; export it again"
            )
        for name in names:
            expected = files[name]
            path = self.path / name
            if not path.is_file():
                raise RepositoryError(f"{path} is missing; the version folder is incomplete, export it again")
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            if digest.hexdigest() != expected:
                raise RepositoryError(
                    f"{path} does not match the SHA-256 in metadata.json; it was changed or damaged"
                )


def _session(path: Path, preference: Backend, intra_op_threads: int) -> ort.InferenceSession:
    """A session set up like :class:`OnnxEngine`'s (no spinning idle threads)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), sess_options=options, providers=choose_providers(preference))
    return session
