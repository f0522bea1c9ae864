"""Datasets (built-in digits, image folders, CIFAR-10 batches, .npz, Hugging Face) and VAE latent shards."""

from .datasets import (
    IMAGE_EXTENSIONS,
    ImageDataset,
    ImageFolderDataset,
    TensorImageDataset,
    build_dataset,
    dataset_tensor,
    digits_split,
)
from .latents import LatentDataset, decode_latents, encode_latents, load_vae

__all__ = [
    "IMAGE_EXTENSIONS", "ImageDataset", "ImageFolderDataset", "TensorImageDataset", "LatentDataset",
    "build_dataset", "dataset_tensor", "digits_split", "encode_latents", "decode_latents", "load_vae",
]
