"""New tokens with their own embeddings in a tokenizer and its text encoder: the textual-inversion half of pivotal
tuning, as diffusers' advanced DreamBooth scripts train and save it.

A token-embeddings file (`<name>_emb.safetensors`) holds one `[num_tokens, hidden]` tensor per text encoder: `clip_l`
for a pipeline's `text_encoder`, `clip_g` for SDXL's and SD3's second CLIP (`text_encoder_2`), `t5` for the T5
encoder of Flux (`text_encoder_2`) or SD3 (`text_encoder_3`), as diffusers' advanced Flux script writes it. Our
training scripts also record the tokens' names in its metadata; files without them (diffusers') name the tokens
`<s0>`, `<s1>`, ...
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import torch

TOKEN_EMBEDDING_KEYS = ("clip_l", "clip_g", "t5")  # the keys of a file's tensors, one per kind of text encoder
TOKENS_KEY = "sara_tokens"  # safetensors metadata: the tokens' names, a JSON list
EMBEDDINGS_FILE_SUFFIX = "_emb.safetensors"


def default_tokens(count: int) -> list[str]:
    """The names diffusers' advanced scripts give the new tokens of one abstraction: `<s0>`, `<s1>`, ..."""
    return [f"<s{index}>" for index in range(count)]


def read_token_embeddings(path: str) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """The tensors of a token-embeddings file by key, the tokens' names and the file's metadata.

    Raises ValueError, naming the file and the problem, for a file that cannot be read or is not laid out as above.
    """
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises several types for a damaged file
        raise ValueError(f"Could not read the token embeddings {path}: {error}") from error
    unknown = sorted(set(tensors) - set(TOKEN_EMBEDDING_KEYS))
    if not tensors or unknown:
        raise ValueError(
            f"The token embeddings {path} hold the keys {sorted(tensors)}; expected {list(TOKEN_EMBEDDING_KEYS)} "
            "(one [num_tokens, hidden] tensor per text encoder)."
        )
    counts = {key: tensor.shape[0] for key, tensor in tensors.items() if tensor.dim() == 2}
    if len(counts) < len(tensors) or len(set(counts.values())) != 1 or not all(counts.values()):
        shapes = {key: list(tensor.shape) for key, tensor in tensors.items()}
        raise ValueError(f"The token embeddings {path} must be [num_tokens, hidden] alike in count, got {shapes}.")
    if not all(tensor.is_floating_point() and torch.isfinite(tensor).all() for tensor in tensors.values()):
        raise ValueError(f"The token embeddings {path} hold values that are not finite numbers.")
    count = next(iter(counts.values()))
    tokens = default_tokens(count)
    if TOKENS_KEY in metadata:
        try:
            tokens = json.loads(metadata[TOKENS_KEY])
        except ValueError:
            tokens = None
        if not (isinstance(tokens, list) and len(tokens) == count and all(isinstance(t, str) and t for t in tokens)):
            raise ValueError(f"The token embeddings {path} name {metadata[TOKENS_KEY]!r} as their {count} tokens.")
    return tensors, tokens, metadata


def token_embedding_targets(pipeline: Any) -> dict[str, tuple[str, str]]:
    """The (text encoder, tokenizer) attribute names of each key's encoder in a pipeline, found by the encoders'
    classes: `clip_l` the CLIP `text_encoder`, `clip_g` a CLIP `text_encoder_2`, `t5` the pipeline's T5 encoder."""
    targets = {}
    for suffix in ("", "_2", "_3"):
        encoder_class = type(getattr(pipeline, f"text_encoder{suffix}", None)).__name__
        if encoder_class.startswith("T5"):
            key = "t5"
        elif encoder_class.startswith("CLIPText"):  # with or without projection
            key = "clip_g" if suffix else "clip_l"
        else:
            continue
        targets.setdefault(key, (f"text_encoder{suffix}", f"tokenizer{suffix}"))
    return targets


def check_new_tokens(
    tokenizer: Any, text_encoder: torch.nn.Module, tokens: list[str], embeddings: torch.Tensor
) -> None:
    """Refuse, before anything changes, tokens that the tokenizer has already or embeddings of the wrong width."""
    hidden = text_encoder.get_input_embeddings().weight.shape[1]
    if embeddings.dim() != 2 or embeddings.shape != (len(tokens), hidden):
        raise ValueError(
            f"{len(tokens)} new tokens for a text encoder of hidden size {hidden} need embeddings of shape "
            f"[{len(tokens)}, {hidden}], got {list(embeddings.shape)} (trained for another base model?)."
        )
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"The new tokens {tokens} repeat a name.")
    present = [token for token in tokens if token in tokenizer.get_vocab()]
    if present:
        raise ValueError(
            f"The tokenizer has the tokens {present} already (loaded before?): load the embeddings into a pipeline "
            "without them."
        )


def add_new_tokens(
    tokenizer: Any, text_encoder: torch.nn.Module, tokens: list[str], embeddings: torch.Tensor
) -> Callable[[], None]:
    """Add `tokens` to the tokenizer and their rows `embeddings` ([len(tokens), hidden]) to the text encoder's input
    embeddings, as diffusers' `load_textual_inversion` does; returns a function that undoes it exactly.

    The embedding module and its Parameter stay the same objects (their data grows), so that code holding them, and
    the module's class, are unaffected; the rows of every other token are not touched.
    """
    check_new_tokens(tokenizer, text_encoder, tokens, embeddings)
    tokenizer_state = copy.deepcopy(vars(tokenizer))
    module = text_encoder.get_input_embeddings()
    old_data, old_rows = module.weight.data, module.num_embeddings
    old_vocab_size = getattr(text_encoder.config, "vocab_size", None)

    def undo() -> None:
        vars(tokenizer).clear()
        vars(tokenizer).update(tokenizer_state)
        module.weight.data, module.num_embeddings = old_data, old_rows
        if old_vocab_size is not None:
            text_encoder.config.vocab_size = old_vocab_size

    try:
        tokenizer.add_tokens(tokens)
        ids = tokenizer.convert_tokens_to_ids(tokens)
        rows = max(old_rows, max(ids) + 1)
        data = (
            torch.cat([old_data, old_data.new_zeros(rows - old_rows, old_data.shape[1])])
            if rows > old_rows
            else (old_data.clone())
        )
        data[ids] = embeddings.to(device=data.device, dtype=data.dtype)
        module.weight.data, module.num_embeddings = data, rows
        if old_vocab_size is not None:
            text_encoder.config.vocab_size = rows
    except BaseException:
        undo()
        raise
    return undo


def token_ids(tokenizer: Any, tokens: list[str]) -> list[int]:
    """The tokenizer's ids of tokens it has (ValueError naming those it lacks)."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in tokens if token not in vocab]
    if missing:
        raise ValueError(f"The tokenizer lacks the tokens {missing}.")
    return [vocab[token] for token in tokens]
