"""vLLM's CPU LoRA kernels, computed as one matmul per adapter instead of one gathered matrix per token.

vLLM's CPU punica wrapper (``vllm/lora/punica_wrapper/punica_cpu.py``) calls the PyTorch-native ops of
``vllm/lora/ops/torch_ops/lora_ops.py``. Those index the stacked LoRA weights with the per-token adapter
index (``lora_b_weights[indices]``: a copy of a whole [out, rank] matrix for every token) and then
contract with an einsum: O(tokens x out x rank) memory traffic per call, where one
[tokens, in] @ [in, rank] matmul does the same work. Measured on 2 cores (fp32, in=576, rank 32,
4,096 tokens): 112 ms per shrink and 120 ms per expand, against 4 ms for both as plain matmuls, and
vLLM calls them for every LoRA-wrapped projection of every layer. End to end (SmolLM2-135M, 20 prompts
of 220 tokens, a rank-32 merged adapter, 2026-11-29, machine busy): with vLLM's ops the first request
took 77 s and the same request again 173 s; with these, 36.7 s for the server's first request (its
warm-up), then 2.5 s, and 2.9 s for a request with a new adapter. p(yes) agreed to 5e-6 in log-prob.

Here every op groups the tokens by adapter index (consecutive runs, which is what a prefill batch is)
and runs one matmul per run; tokens with index -1 (no LoRA) get nothing. Same semantics as the
originals otherwise (output written, or added with ``add_inputs``). ``register`` is vLLM's general
plugin entry point (group ``vllm.general_plugins``); it runs in every vLLM process and may run twice.
"""

import torch

_PATCHED = "_apa_cpu_lora_patched"


def _runs(indices: torch.Tensor) -> list[tuple[int, int, int]]:
    """(adapter index, start, end) of each run of equal consecutive indices."""
    values, counts = torch.unique_consecutive(indices, return_counts=True)
    runs, start = [], 0
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        runs.append((int(value), start, start + int(count)))
        start += int(count)
    return runs


def _grouped(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
             dtype: torch.dtype) -> list[tuple[int, int, torch.Tensor]]:
    """Per run of tokens that use a LoRA: (start, end, inputs[start:end] @ weights[index].T)."""
    if weights.dim() == 4:  # [loras, 1, out, in]
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    out = []
    for index, start, end in _runs(indices[: inputs.shape[0]]):
        if index < 0:
            continue
        out.append((start, end, inputs[start:end] @ weights[index].to(dtype).T))  # [run, out]
    return out


def bgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, scaling: float = 1.0) -> None:
    rank = lora_a_weights.shape[-2]
    output_tensor[:, :rank] = 0
    for start, end, y in _grouped(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype):
        output_tensor[start:end, :rank] = scaling * y


def bgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, add_inputs: bool = True) -> None:
    width = min(lora_b_weights.shape[-2], output_tensor.shape[1])  # adapter and model may pad differently
    if not add_inputs:
        output_tensor[:, :width] = 0
    for start, end, y in _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype):
        output_tensor[start:end, :width] += y[:, :width]


def bgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      lora_indices_tensor: torch.Tensor, slice_offset: int, slice_size: int,
                      add_inputs: bool = True) -> None:
    columns = slice(slice_offset, slice_offset + slice_size)
    if not add_inputs:
        output_tensor[:, columns] = 0
    for start, end, y in _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype):
        output_tensor[start:end, columns] += y


def _token_indices(seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)  # [tokens]


def sgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                batches: int, max_seq_length: int, token_nums: int, scaling: float) -> None:
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _token_indices(seq_len_tensor, lora_indices_tensor),
                scaling)


def sgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                batches: int, max_seq_length: int, token_nums: int, add_inputs: bool = False) -> None:
    bgmv_expand(inputs, lora_b_weights, output_tensor, _token_indices(seq_len_tensor, lora_indices_tensor),
                add_inputs)


def sgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      b_seq_start_loc: torch.Tensor, seq_len_tensor: torch.Tensor,
                      lora_indices_tensor: torch.Tensor, batches: int, max_seq_length: int, token_nums: int,
                      slice_offset: int, slice_size: int, add_inputs: bool = False) -> None:
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _token_indices(seq_len_tensor, lora_indices_tensor),
                      slice_offset, slice_size, add_inputs)


OPS = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice,
       "sgmv_shrink": sgmv_shrink, "sgmv_expand": sgmv_expand, "sgmv_expand_slice": sgmv_expand_slice}


def register() -> None:
    """Point vLLM's CPU punica wrapper (and the torch_ops package it imports from) at these ops."""
    import os

    if os.environ.get("APA_VLLM_NATIVE_LORA_OPS") == "1":  # to measure vLLM's own ops
        return
    from vllm.lora.ops import torch_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(punica_cpu, _PATCHED, False):
        return
    for name, op in OPS.items():
        setattr(punica_cpu, name, op)
        setattr(torch_ops, name, op)
    setattr(punica_cpu, _PATCHED, True)
