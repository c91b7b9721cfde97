"""Batched embedding with MagFace magnitudes, and the on-disk embedding format."""

from magface_al.embedding.embed import EncodedImageDataset, ImageFileDataset, embed_batch, embed_dataset, embed_images
from magface_al.embedding.store import Embeddings, load_embeddings, save_embeddings

__all__ = [
    "EncodedImageDataset",
    "Embeddings",
    "ImageFileDataset",
    "embed_batch",
    "embed_dataset",
    "embed_images",
    "load_embeddings",
    "save_embeddings",
]
