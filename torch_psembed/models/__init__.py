"""CTR models (CTR DNN, DeepFM) over PS or hashed slot embeddings."""

from .ctr import CTRDNN, MODELS, DeepFM, build_model
from .embeddings import HashedSlotEmbedding, PSSlotEmbedding

__all__ = ["CTRDNN", "DeepFM", "build_model", "MODELS", "PSSlotEmbedding", "HashedSlotEmbedding"]
