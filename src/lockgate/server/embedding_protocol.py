"""OpenAI's `/v1/embeddings` shapes: the request body (validated strictly, as protocol.py's bodies)
and the answer (documentation only: the route builds a plain dict)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from lockgate.server.protocol import INT32_MAX, Informational, _Body, _informational

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
MAX_INPUT_CHARS = 10_000_000  # text in one request, all inputs together


class EmbeddingRequest(_Body):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description=f"A text, a list of texts, one token-id list, or a list of token-id lists; at most "
                    f"{MAX_INPUTS} inputs, none empty, each within the model's context")
    encoding_format: Literal["float", "base64"] | None = Field(
        default="float", description="`float`: a list of numbers; `base64`: the vector's little-endian float32 "
                                     "bytes in base64, as OpenAI sends them")
    dimensions: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = Field(
        default=None, description="Keep the vector's first N values, normalized again (as OpenAI's "
                                  "text-embedding-3 models shorten theirs); 1 to the model's hidden size")
    user: Annotated[Annotated[str, Field(max_length=256)] | None, Informational()] = _informational(
        "not stored; keeps the caller on one version of a traffic split")


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


class EmbeddingData(_Doc):
    object: Literal["embedding"]
    index: int = Field(description="The input's position in the request")
    embedding: list[float] | str = Field(
        description="Unit-norm vector: a list of numbers, or base64 of its little-endian float32 bytes")


class EmbeddingTokensDetails(_Doc):
    cached_tokens: int = Field(description="Input tokens whose vector came from the embedding cache")


class EmbeddingUsage(_Doc):
    prompt_tokens: int = Field(description="Every input's tokens, cached ones included")
    total_tokens: int
    prompt_tokens_details: EmbeddingTokensDetails | None = None


class EmbeddingResponse(_Doc):
    """One vector per input, in input order: the model's pooled last hidden state (docs/API.md)."""

    object: Literal["list"]
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
