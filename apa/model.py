"""The frozen base LLM: loading, batching prompts, and the one-token Yes/No readout.

Only the hidden state of the last prompt token matters here (the answer is one token), so every
forward runs the decoder, gathers that position and applies the two Yes/No rows of the LM head.
Prompts are right-padded (positions stay those of an unpadded run) and sorted by length per call.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
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
    heads: "dict[str, PackedRow]" = field(default_factory=dict, repr=False)  # template heads' keys/values, by noun

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
    head: "PackedRow | None" = None, done: Callable[[list[int], torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Last hidden state of every prompt, in input order: [n, hidden] (float32, on CPU).

    ``model`` defaults to the base model; pass a PEFT model to read through its adapters.
    ``around(index)`` wraps each batch's forward (engines set their per-batch mixture with it).
    ``head``: a token prefix with its keys and values, computed by the same model (e.g. the prompt
    template's, ``apa.embeddings.template_head``); the prompts that start with it run only the rest
    of their tokens against it (``packed_last_hidden``, one row each), the others whole.
    ``done(index, hidden)`` is called after each batch with its rows (callers keep results as they come).
    """
    net = base.model if model is None else model
    out = torch.empty(len(texts), net.config.hidden_size, dtype=torch.float32)
    bar = tqdm(total=len(texts), desc=desc, disable=desc is None, unit="sample")
    whole: Sequence[int] = range(len(texts))
    if head is not None and head.cached is not None and texts:
        ids, n, start_ids = token_ids(base.tokenizer, texts), len(head.prefix), list(head.prefix)
        headed = sorted((i for i, x in enumerate(ids) if len(x) > n and x[:n] == start_ids),
                        key=lambda i: len(ids[i]))
        for start in range(0, len(headed), batch_size):
            index = headed[start:start + batch_size]
            with around(index) if around is not None else nullcontext():
                out[index] = headed_last_hidden(net, head, [ids[i][n:] for i in index], base.device).float().cpu()
            if done is not None:
                done(index, out[index])
            bar.update(len(index))
        ran = set(headed)
        whole = [i for i in whole if i not in ran]
    for order in batches_by_length(base.tokenizer, [texts[i] for i in whole], batch_size):
        index = [whole[i] for i in order]
        batch = encode(base.tokenizer, [texts[i] for i in index], base.device)
        with around(index) if around is not None else nullcontext():
            out[index] = last_hidden(net, batch).float().cpu()
        if done is not None:
            done(index, out[index])
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


@dataclass(frozen=True)
class PackedRow:
    """Prompts that share ``prefix``: their suffixes go packed into one row after it. With ``cached`` (the
    prefix's keys and values) only the suffixes run; without, the prefix runs first in the same row."""

    prefix: Sequence[int]
    suffixes: Sequence[Sequence[int]]
    cached: KeyValues | None = None


def packed_last_hidden(model: Any, rows: Sequence[PackedRow], device: torch.device,
                       ) -> list[tuple[torch.Tensor, KeyValues]]:
    """Per row: the final hidden state at each suffix's last token ([n, hidden]) and the prefix's keys and
    values (to cache). All rows run in one forward; each row has its own mixture weights (``MIXTURE``).

    A block mask lets each suffix token see its prefix and the earlier tokens of its own suffix only, and
    each suffix's positions continue the prefix's, so every suffix is computed exactly as in its full
    prompt; the prefix is never copied per prompt. Rows of different lengths are padded: cached keys to
    the longest cache, new tokens to the longest row; a padded key is masked out (its weight is exactly
    0) and a padded query only sees itself.
    """
    from transformers import DynamicCache

    past = max((len(r.prefix) for r in rows if r.cached is not None), default=0)  # cached keys per row, padded
    heads = [0 if r.cached is not None else len(r.prefix) for r in rows]  # prefix tokens each row runs itself
    news = [list(r.prefix[:h]) + [t for s in r.suffixes for t in s] for r, h in zip(rows, heads, strict=True)]
    width = max(map(len, news))
    ids = torch.tensor([x + [0] * (width - len(x)) for x in news], device=device)  # [rows, width]
    positions = torch.zeros(len(rows), width, dtype=torch.long)  # [rows, width]
    allowed = torch.zeros(len(rows), width, past + width, dtype=torch.bool)  # [rows, queries, keys]
    for i, (row, new, head) in enumerate(zip(rows, news, heads, strict=True)):
        p = len(row.prefix)
        segment = torch.tensor([-1] * head + [j for j, s in enumerate(row.suffixes) for _ in s])  # -1 = prefix
        positions[i, :len(new)] = torch.tensor(list(range(head)) + [p + j for s in row.suffixes for j in range(len(s))])
        own = torch.arange(len(new))
        causal = own[None, :] <= own[:, None]  # [q, q]
        allowed[i, :len(new), past:past + len(new)] = causal & (
            (segment[None, :] == -1) | (segment[None, :] == segment[:, None]))
        if row.cached is not None:
            allowed[i, :len(new), :p] = True  # the cached prefix, seen by every suffix token
        pads = torch.arange(len(new), width)
        allowed[i, pads, past + pads] = True
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    cache: Any = DynamicCache(config=model.config)
    if past:  # the update concatenates: a cached prefix is never written
        template = next(r.cached for r in rows if r.cached is not None)
        cache = DynamicCache([tuple(torch.cat([_padded(r.cached, template, past, layer, which) for r in rows])
                                    for which in (0, 1)) for layer in range(len(template))], config=model.config)
    out = model.get_decoder()(input_ids=ids, attention_mask=mask[:, None].to(device),
                              position_ids=positions.to(device), cache=cache, use_cache=True)
    results = []
    for i, (row, head) in enumerate(zip(rows, heads, strict=True)):
        ends = torch.tensor([len(s) for s in row.suffixes], dtype=torch.long).cumsum(0) - 1 + head  # [n]
        hidden = out.last_hidden_state[i, ends.to(device)]  # [n, hidden]
        states = row.cached if row.cached is not None else [
            (layer.keys[i:i + 1, :, past:past + head].clone(), layer.values[i:i + 1, :, past:past + head].clone())
            for layer in cache.layers]
        results.append((hidden, states))
    return results


def run_head(model: Any, tokens: Sequence[int], device: torch.device) -> PackedRow:
    """``tokens`` run alone through ``model``: a prefix with its keys and values, for ``headed_last_hidden``.
    Under autograd (training) the keys and values keep their graph, so gradients reach the head's LoRA."""
    [(_, states)] = packed_last_hidden(model, [PackedRow(prefix=tuple(tokens), suffixes=[])], device)
    return PackedRow(prefix=tuple(tokens), suffixes=[], cached=states)


def headed_last_hidden(model: Any, head: PackedRow, suffixes: Sequence[Sequence[int]], device: torch.device,
                       ) -> torch.Tensor:
    """The final hidden state of each prompt ``head.prefix + suffix`` ([n, hidden]): every suffix in a row
    of its own against the head's keys and values (``run_head``), so the head runs once, not n times.
    Equal to the whole prompts' forward (``last_hidden``); gradients flow into the head through its
    keys and values, summed over the rows that read them."""
    rows = [PackedRow(prefix=head.prefix, suffixes=[suffix], cached=head.cached) for suffix in suffixes]
    return torch.cat([h for h, _ in packed_last_hidden(model, rows, device)])  # [n, hidden]


def _padded(cached: KeyValues | None, template: KeyValues, length: int, layer: int, which: int) -> torch.Tensor:
    """One layer's cached keys (``which`` 0) or values (1), zero-padded along the sequence to ``length``
    (a row without a cache: all padding, shaped like ``template``)."""
    t = (cached or template)[layer][which]  # [1, kv_heads, p, head_dim]
    if cached is None:
        t = t[:, :, :0]
    return torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[2]))
