"""Batched embedding with MagFace magnitudes, inference backends with parity gates, and the on-disk format."""

from magface_al.embedding.backends import Backend, BackendUnavailableError, available_backends, build_backend
from magface_al.embedding.embed import EncodedImageDataset, ImageFileDataset, embed_batch, embed_dataset, embed_images
from magface_al.embedding.parity import ParityOptions, select_backend
from magface_al.embedding.store import Embeddings, load_embeddings, save_embeddings

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "EncodedImageDataset",
    "Embeddings",
    "ImageFileDataset",
    "ParityOptions",
    "available_backends",
    "build_backend",
    "embed_batch",
    "embed_dataset",
    "embed_images",
    "load_embeddings",
    "save_embeddings",
    "select_backend",
]
