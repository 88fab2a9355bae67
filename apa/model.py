"""The frozen base LLM: loading, batching prompts, and the one-token Yes/No readout.

Only the hidden state of the last prompt token matters here (the answer is one token), so every
forward runs the decoder, gathers that position and applies the two Yes/No rows of the LM head.
Prompts are right-padded (positions stay those of an unpadded run) and sorted by length per call.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from apa import prompts
from apa.assets import asset_name, base_model_sha256
from apa.errors import AssetError

MAX_PROMPT_TOKENS = 1024


@dataclass
class BaseModel:
    """A loaded causal LM with its tokenizer and the ids of the first tokens of "Yes." and "No."."""

    model: Any  # transformers PreTrainedModel (causal LM)
    tokenizer: Any
    sha256: str
    name: str
    yes_id: int
    no_id: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def answer_token_ids(tokenizer: Any) -> tuple[int, int]:
    """Ids of "Yes" and "No" as the first token after ``### Response:\\n``."""
    ids = []
    for word in (prompts.YES, prompts.NO):
        marker = tokenizer(prompts.RESPONSE_MARKER, add_special_tokens=False)["input_ids"]
        full = tokenizer(prompts.RESPONSE_MARKER + word, add_special_tokens=False)["input_ids"]
        if full[: len(marker)] != marker or len(full) <= len(marker):
            raise AssetError(f"tokenizer splits the answer {word!r} unexpectedly")
        ids.append(int(full[len(marker)]))
    return ids[0], ids[1]


def load_base_model(model_dir: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> BaseModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise AssetError(f"no base model at {model_dir}: run `apa assets fetch`")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    yes_id, no_id = answer_token_ids(tokenizer)
    return BaseModel(model=model, tokenizer=tokenizer, sha256=base_model_sha256(model_dir),
                     name=asset_name(model_dir), yes_id=yes_id, no_id=no_id)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    last: torch.Tensor  # [batch] index of each prompt's last token


def encode(tokenizer: Any, texts: Sequence[str], device: torch.device) -> Batch:
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_PROMPT_TOKENS,
                    return_tensors="pt")
    mask = enc["attention_mask"]
    return Batch(input_ids=enc["input_ids"].to(device), attention_mask=mask.to(device),
                 last=(mask.sum(dim=1) - 1).to(device))


def last_hidden(model: Any, batch: Batch) -> torch.Tensor:
    """Final (normed) hidden state at each prompt's last token: [batch, hidden]."""
    decoder = model.get_decoder()
    out = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    hidden = out.last_hidden_state  # [batch, seq, hidden]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, batch.last]  # [batch, hidden]


def answer_logits(model: Any, hidden: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """Logits of (Yes, No) from last hidden states: [batch, 2]."""
    head: nn.Linear = model.get_output_embeddings()
    weight = head.weight[[yes_id, no_id]]  # [2, hidden]
    logits = hidden @ weight.T  # [batch, 2]
    if head.bias is not None:
        logits = logits + head.bias[[yes_id, no_id]]
    return logits


def p_yes(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over (Yes, No), probability of Yes: [batch]."""
    return torch.softmax(logits.float(), dim=-1)[:, 0]


def batches_by_length(tokenizer: Any, texts: Sequence[str], batch_size: int) -> Iterator[list[int]]:
    """Index batches of similar prompt length (less padding), covering every index once."""
    if not texts:
        return
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


@torch.inference_mode()
def forward_last_hidden(
    base: BaseModel, texts: Sequence[str], *, batch_size: int = 8, desc: str | None = None,
    model: Any = None, around: Callable[[list[int]], AbstractContextManager[None]] | None = None,
) -> torch.Tensor:
    """Last hidden state of every prompt, in input order: [n, hidden] (float32, on CPU).

    ``model`` defaults to the base model; pass a PEFT model to read through its adapters.
    ``around(index)`` wraps each batch's forward (engines set their per-batch mixture with it).
    """
    net = base.model if model is None else model
    out = torch.empty(len(texts), net.config.hidden_size, dtype=torch.float32)
    bar = tqdm(total=len(texts), desc=desc, disable=desc is None, unit="sample")
    for index in batches_by_length(base.tokenizer, texts, batch_size):
        batch = encode(base.tokenizer, [texts[i] for i in index], base.device)
        with around(index) if around is not None else nullcontext():
            out[index] = last_hidden(net, batch).float().cpu()
        bar.update(len(index))
    bar.close()
    return out


@torch.inference_mode()
def score_hidden(base: BaseModel, hidden: torch.Tensor, model: Any = None) -> torch.Tensor:
    """p(yes) from last hidden states (the LM head is shared by base and adapters): [n]."""
    net = base.model if model is None else model
    head = net.get_output_embeddings()
    logits = answer_logits(net, hidden.to(head.weight.device, head.weight.dtype), base.yes_id, base.no_id)
    return p_yes(logits).cpu()


# -- prompts that share a prefix: the prefix once, then every prompt's suffix against its keys/values --------
def token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Each prompt's token ids exactly as ``encode`` feeds them to the model (no padding)."""
    return [list(ids) for ids in
            tokenizer(list(texts), truncation=True, max_length=MAX_PROMPT_TOKENS)["input_ids"]]


def shared_prefix_length(ids: Sequence[Sequence[int]]) -> int:
    """Length of the longest common token prefix, short enough to leave every prompt one token of its own
    (its last token is where the answer is read)."""
    limit = min(len(x) for x in ids) - 1
    first = ids[0]
    n = 0
    while n < limit and all(x[n] == first[n] for x in ids):
        n += 1
    return n


KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, kv_heads, prefix, head_dim]


def packed_last_hidden(model: Any, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], device: torch.device,
                       cached: KeyValues | None = None) -> tuple[torch.Tensor, KeyValues]:
    """Final hidden state at each suffix's last token, all suffixes packed into one sequence after the
    prefix: [n, hidden], and the prefix's keys and values (to cache).

    A block mask lets each suffix token see the prefix and the earlier tokens of its own suffix only,
    and each suffix's positions continue the prefix's, so every suffix is computed exactly as in its
    full prompt; with ``cached`` keys/values of the prefix, only the suffixes run (with no suffixes,
    only the prefix). One row, so the prefix is never copied per prompt.
    """
    from transformers import DynamicCache

    p, lengths = len(prefix), [len(s) for s in suffixes]
    head = [] if cached is not None else list(prefix)
    ids = torch.tensor([head + [t for s in suffixes for t in s]], device=device)  # [1, q]
    segment = torch.tensor([-1] * p + [i for i, n in enumerate(lengths) for _ in range(n)])  # [keys]: -1 = prefix
    keys = len(segment)
    queries = torch.arange(keys - ids.shape[1], keys)  # [q]: each query's index among the keys
    key_index = torch.arange(keys)  # [keys]
    allowed = (key_index[None, :] <= queries[:, None]) & (  # [q, keys]
        (segment[None, :] == -1) | (segment[None, :] == segment[queries][:, None]))
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)  # [q, keys]
    positions = torch.tensor(list(range(p)) + [p + j for n in lengths for j in range(n)])[queries]  # [q]
    cache: Any = DynamicCache(config=model.config) if cached is None else DynamicCache(
        list(cached), config=model.config)  # the update concatenates: a cached prefix is never written
    out = model.get_decoder()(input_ids=ids, attention_mask=mask[None, None].to(device),
                              position_ids=positions[None, :].to(device), cache=cache, use_cache=True)
    ends = torch.tensor(lengths, dtype=torch.long).cumsum(0) - 1 + (0 if cached is not None else p)  # [n]
    hidden = out.last_hidden_state[0, ends.to(device)]  # [n, hidden]
    states = cached if cached is not None else [(layer.keys[:, :, :p].clone(), layer.values[:, :, :p].clone())
                                               for layer in cache.layers]
    return hidden, states
