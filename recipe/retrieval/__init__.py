"""Retrieval side of RECIPE: the knowledge repository (FAISS keys + continuous prompts)."""
from recipe.retrieval.repository import (
    DuplicateIdError,
    KnowledgeRepository,
    RepositoryCorruptError,
    RepositoryError,
    RepositoryInputError,
    RepositoryMismatchError,
    RepositoryNotFoundError,
    UnknownIdError,
)

__all__ = [
    "DuplicateIdError",
    "KnowledgeRepository",
    "RepositoryCorruptError",
    "RepositoryError",
    "RepositoryInputError",
    "RepositoryMismatchError",
    "RepositoryNotFoundError",
    "UnknownIdError",
]
