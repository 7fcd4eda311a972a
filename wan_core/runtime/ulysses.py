"""Ulysses sequence parallelism: the video tokens split across k ranks, heads traded for tokens.

Applied to built models from outside through the DiT's one seam, `WanDiT.sequence_layout`:
`ulysses_layout(experts, ...)` sets an `UlyssesLayout` on every expert for the duration of a run
and puts the previous layout back on exit (errors included). Per forward, with L tokens and k
ranks, every rank holds `ceil(L / k)` consecutive token rows (the sequence padded at the end to a
multiple of k, as the official code pads to `seq_len`):

1. The patch embedding, time and text embeddings run on every rank (cheap); each rank keeps its
   rows of the tokens, of the per-token time tables (TI2V) and of the RoPE table, so every token
   is rotated by its own position.
2. Self-attention: q, k and v of the local rows (all N heads) go through one all-to-all to all L
   rows of N / k heads; attention runs over every key, the padding rows masked as keys; a second
   all-to-all brings the output back to the local rows and all heads.
3. Cross-attention, the FFN and the modulations are per token: they run on the local rows against
   the replicated text context, with no communication.
4. The head runs on the local rows; one all-gather assembles the L rows before unpatchifying.

The result equals the single-process forward up to float rounding (the same sums in other
matmul shapes). Head counts must divide by k (24 for TI2V-5B, 40 for A14B);
`ParallelPlan.check_heads` refuses other splits before anything runs.

Shapes: q, k, v (B, L_local, N, Dh) <-> (B, L_pad, N/k, Dh); L_pad = k * L_local >= L.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..attention import AttentionBackend, attention
from ..config import COMM_ALL_TO_ALL, COMM_GATHER
from ..dit import SequenceLayout, TokenShard
from ..rope import RopeTables
from .comm import CommMeter, all_gather_rows, all_to_all_dim0

__all__ = ["UlyssesLayout", "UlyssesShard", "heads_to_tokens", "tokens_to_heads", "ulysses_layout"]


def tokens_to_heads(x: torch.Tensor, group: dist.ProcessGroup, meter: CommMeter) -> torch.Tensor:
    """From the local token rows with every head to every row with the local heads.

    Shapes: x (*lead, L_local, N, Dh) -> (*lead, k * L_local, N/k, Dh).
    """
    k = dist.get_world_size(group)
    send = x.unflatten(-2, (k, -1)).movedim(-3, 0)  # (k, *lead, L_local, N/k, Dh): head group p -> rank p
    recv = all_to_all_dim0(send, group, meter, kind=COMM_ALL_TO_ALL)  # chunk p: rows of rank p
    return recv.movedim(0, -4).flatten(-4, -3)  # (*lead, k * L_local, N/k, Dh)


def heads_to_tokens(x: torch.Tensor, group: dist.ProcessGroup, meter: CommMeter) -> torch.Tensor:
    """The inverse of `tokens_to_heads`.

    Shapes: x (*lead, k * L_local, N/k, Dh) -> (*lead, L_local, N, Dh).
    """
    k = dist.get_world_size(group)
    send = x.unflatten(-3, (k, -1)).movedim(-4, 0)  # (k, *lead, L_local, N/k, Dh): row block p -> rank p
    recv = all_to_all_dim0(send, group, meter, kind=COMM_ALL_TO_ALL)  # chunk p: head group p
    return recv.movedim(0, -3).flatten(-3, -2)  # (*lead, L_local, N, Dh)


class UlyssesShard(TokenShard):
    """Rows `[index * rows, (index + 1) * rows)` of a sequence of `num_tokens` padded to `degree * rows`."""

    def __init__(self, num_tokens: int, *, degree: int, index: int, group: dist.ProcessGroup,
                 meter: CommMeter) -> None:
        self.num_tokens = num_tokens
        self.rows = math.ceil(num_tokens / degree)
        self.start = index * self.rows
        self.padded = self.rows * degree
        self.group = group
        self.meter = meter

    def local(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            return x  # one row for every token
        if x.shape[1] != self.num_tokens:
            raise ValueError(f"per-token rows must number {self.num_tokens}; got shape {tuple(x.shape)}")
        part = x[:, self.start:self.start + self.rows]
        missing = self.rows - part.shape[1]  # padding rows at the end of the sequence
        if missing:
            part = torch.cat((part, part.new_zeros(part.shape[0], missing, *part.shape[2:])), dim=1)
        return part

    def local_rope(self, rope: RopeTables) -> RopeTables:
        end = min(self.start + self.rows, self.num_tokens)
        start = min(self.start, end)
        return RopeTables(rope.pairs[start:end], rope.freqs[start:end])  # padding rows are not rotated

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       backend: AttentionBackend) -> torch.Tensor:
        qkv = tokens_to_heads(torch.stack((q, k, v)), self.group, self.meter)  # (3, B, L_pad, N/k, Dh)
        q_all, k_all, v_all = qkv.unbind(0)
        k_lens = None
        if self.padded > self.num_tokens:
            k_lens = torch.full((q.shape[0],), self.num_tokens, dtype=torch.int64, device=q.device)
            reason = backend.supports(q_all, k_all, v_all, k_lens)
            if reason is not None:
                raise ValueError(f"Ulysses pads {self.num_tokens} tokens to {self.padded} and masks the padding, "
                                 f"but attention backend {backend.name!r} cannot: {reason}. Use attention "
                                 "'sdpa' or 'flash_attn', or a size whose token count divides by the rank count")
        out = attention(q_all, k_all, v_all, backend=backend, k_lens=k_lens)  # (B, L_pad, N/k, Dh)
        return heads_to_tokens(out, self.group, self.meter)  # (B, L_local, N, Dh)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        parts = all_gather_rows(x, self.group, self.meter, kind=COMM_GATHER)  # k x (B, L_local, C)
        return torch.cat(parts, dim=1)[:, :self.num_tokens]  # (B, L, C)


class UlyssesLayout(SequenceLayout):
    """Every forward split `degree` ways; this rank computes shard `index`."""

    def __init__(self, *, degree: int, index: int, group: dist.ProcessGroup, meter: CommMeter) -> None:
        if dist.get_world_size(group) != degree or not 0 <= index < degree:
            raise ValueError(f"Ulysses needs a group of {degree} ranks and an index in [0, {degree}); "
                             f"got a group of {dist.get_world_size(group)} and index {index}")
        self.degree, self.index, self.group, self.meter = degree, index, group, meter

    def shard(self, num_tokens: int) -> TokenShard:
        return UlyssesShard(num_tokens, degree=self.degree, index=self.index, group=self.group,
                            meter=self.meter)


@contextlib.contextmanager
def ulysses_layout(experts: Sequence[nn.Module], *, group: dist.ProcessGroup | None, degree: int, index: int,
                   meter: CommMeter) -> Iterator[None]:
    """Split every expert's tokens `degree` ways inside the block (nothing happens for degree 1)."""
    if degree == 1:
        yield
        return
    if group is None:
        raise ValueError(f"Ulysses over {degree} ranks needs their process group; got None")
    layout = UlyssesLayout(degree=degree, index=index, group=group, meter=meter)
    models = list({id(m): m for m in experts}.values())
    previous = [m.sequence_layout for m in models]
    for model in models:
        model.sequence_layout = layout
    try:
        yield
    finally:
        for model, before in zip(models, previous, strict=True):
            model.sequence_layout = before
