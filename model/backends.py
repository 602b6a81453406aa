"""Where `encode` and `step` run: torch on CPU, torch on CUDA, or onnxruntime on CPU.

Every backend takes and returns CPU torch tensors, so the worker does not care which runs.
The slot-indexed calls (`encode_into`, `extend_into`) work on a pool of caches that lives on
the backend's `device` (state/kvpool.py): they take slot indices, read and write the pool
there, and bring back only the user vectors and attention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from kvrec.errors import ConfigError
from kvrec.model.choices import BACKENDS
from kvrec.model.encoder import Encoder, KVCache


class StepBackend(Protocol):
    """`encode` a batch of histories; advance cached users by one event (`step`) or by up to
    `max_extend` events each (`extend`; None: up to the model's window W)."""

    max_extend: int | None
    device: torch.device  # where a pool of caches for `encode_into`/`extend_into` lives

    def encode(self, items: Tensor, event_types: Tensor) -> tuple[Tensor, KVCache]: ...

    def encode_into(
        self, pool: KVCache, pool_vectors: Tensor, slots: Tensor, items: Tensor,
        event_types: Tensor,
    ) -> Tensor:
        """`encode` written into rows `slots` of the pool; the vectors [B, d] on the host."""
        ...

    def extend_into(
        self,
        pool: KVCache,
        pool_vectors: Tensor,
        slots: Tensor,
        items: Tensor,
        event_types: Tensor,
        counts: Tensor,
        return_attention: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """`extend` of the caches in rows `slots` of the pool, in place (`Encoder.extend_into`);
        vectors [B, T, d] and attention [B, T, W] on the host."""
        ...

    def step(
        self, cache: KVCache, items: Tensor, event_types: Tensor, return_attention: bool = False
    ) -> tuple[Tensor, KVCache, Tensor | None]: ...

    def extend(
        self,
        cache: KVCache,
        items: Tensor,
        event_types: Tensor,
        counts: Tensor,
        return_attention: bool = False,
    ) -> tuple[Tensor, KVCache, Tensor | None]: ...


class TorchBackend:
    max_extend: int | None = None

    def __init__(self, encoder: Encoder, device: str = "cpu") -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("backend torch-cuda: no CUDA device is available; use torch-cpu")
        self.device = torch.device(device)
        self.encoder = encoder.eval().to(self.device)

    @torch.inference_mode()
    def encode(self, items: Tensor, event_types: Tensor) -> tuple[Tensor, KVCache]:
        vectors, cache = self.encoder.encode(items.to(self.device), event_types.to(self.device))
        return vectors.cpu(), cache.to("cpu")

    @torch.inference_mode()
    def encode_into(
        self, pool: KVCache, pool_vectors: Tensor, slots: Tensor, items: Tensor,
        event_types: Tensor,
    ) -> Tensor:
        device = self.device
        return self.encoder.encode_into(
            pool, pool_vectors, slots.to(device), items.to(device), event_types.to(device)
        ).cpu()

    @torch.inference_mode()
    def extend_into(
        self,
        pool: KVCache,
        pool_vectors: Tensor,
        slots: Tensor,
        items: Tensor,
        event_types: Tensor,
        counts: Tensor,
        return_attention: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        device = self.device
        vectors, attention = self.encoder.extend_into(
            pool, pool_vectors, slots.to(device), items.to(device), event_types.to(device),
            counts.to(device), return_attention=return_attention,
        )
        return vectors.cpu(), attention.cpu() if attention is not None else None

    @torch.inference_mode()
    def step(
        self, cache: KVCache, items: Tensor, event_types: Tensor, return_attention: bool = False
    ) -> tuple[Tensor, KVCache, Tensor | None]:
        return _on_host(self.encoder.step(
            cache.to(self.device),
            items.to(self.device),
            event_types.to(self.device),
            return_attention=return_attention,
        ))

    @torch.inference_mode()
    def extend(
        self,
        cache: KVCache,
        items: Tensor,
        event_types: Tensor,
        counts: Tensor,
        return_attention: bool = False,
    ) -> tuple[Tensor, KVCache, Tensor | None]:
        """Several new events per user in one pass (see `Encoder.extend`)."""
        return _on_host(self.encoder.extend(
            cache.to(self.device),
            items.to(self.device),
            event_types.to(self.device),
            counts.to(self.device),
            return_attention=return_attention,
        ))


def _on_host(
    result: tuple[Tensor, KVCache, Tensor | None],
) -> tuple[Tensor, KVCache, Tensor | None]:
    vectors, cache, attention = result
    return vectors.cpu(), cache.to("cpu"), attention.cpu() if attention is not None else None


class OnnxBackend:
    """`extend` and `step` in onnxruntime (exported by `model.export`); `encode` stays in torch.
    A file exported before `extend` was (inputs without `counts`) holds `step` only: then
    `max_extend` is 1 and the worker gives it one event per user per wave."""

    max_extend: int | None = None
    device = torch.device("cpu")  # a pool of caches for it stays on the host

    def __init__(self, encoder: Encoder, onnx_path: Path, threads: int = 0) -> None:
        import onnxruntime as ort

        if not Path(onnx_path).is_file():
            raise ConfigError(f"backend onnx-cpu: {onnx_path} not found (run `kvrec export`)")
        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(onnx_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ConfigError(f"backend onnx-cpu: cannot load {onnx_path}: {exc}") from exc
        self.has_extend = "counts" in {i.name for i in self.session.get_inputs()}
        self.max_extend = None if self.has_extend else 1
        self.torch = TorchBackend(encoder, "cpu")

    def encode(self, items: Tensor, event_types: Tensor) -> tuple[Tensor, KVCache]:
        return self.torch.encode(items, event_types)

    def encode_into(
        self, pool: KVCache, pool_vectors: Tensor, slots: Tensor, items: Tensor,
        event_types: Tensor,
    ) -> Tensor:
        return self.torch.encode_into(pool, pool_vectors, slots, items, event_types)

    @torch.inference_mode()
    def extend_into(
        self,
        pool: KVCache,
        pool_vectors: Tensor,
        slots: Tensor,
        items: Tensor,
        event_types: Tensor,
        counts: Tensor,
        return_attention: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """The session's `extend` on the gathered rows, whose new caches are copied back."""
        past = KVCache(pool.keys.index_select(1, slots), pool.values.index_select(1, slots),
                       pool.positions.index_select(0, slots))
        vectors, new_cache, attention = self.extend(past, items, event_types, counts,
                                                    return_attention)
        pool.keys.index_copy_(1, slots, new_cache.keys)
        pool.values.index_copy_(1, slots, new_cache.values)
        pool.positions.index_copy_(0, slots, new_cache.positions)
        last = vectors[torch.arange(len(counts)), counts - 1]
        pool_vectors.index_copy_(0, slots, last)
        return vectors, attention

    def _run(self, cache: KVCache, feeds: dict[str, np.ndarray], return_attention: bool
             ) -> tuple[Tensor, KVCache, Tensor | None]:
        vectors, keys, values, positions, attention = self.session.run(None, {
            "keys": cache.keys.numpy(), "values": cache.values.numpy(),
            "positions": cache.positions.numpy(), **feeds,
        })
        new_cache = KVCache(
            torch.from_numpy(keys), torch.from_numpy(values), torch.from_numpy(positions)
        )
        return (
            torch.from_numpy(vectors),
            new_cache,
            torch.from_numpy(attention) if return_attention else None,
        )

    def step(
        self, cache: KVCache, items: Tensor, event_types: Tensor, return_attention: bool = False
    ) -> tuple[Tensor, KVCache, Tensor | None]:
        items64, types64 = items.numpy().astype(np.int64), event_types.numpy().astype(np.int64)
        if not self.has_extend:
            return self._run(cache, {"items": items64, "event_types": types64}, return_attention)
        vectors, new_cache, attention = self._run(cache, {
            "items": items64.reshape(-1, 1), "event_types": types64.reshape(-1, 1),
            "counts": np.ones(len(items64), dtype=np.int64),
        }, return_attention)
        return vectors[:, 0], new_cache, attention[:, 0] if attention is not None else None

    def extend(
        self,
        cache: KVCache,
        items: Tensor,
        event_types: Tensor,
        counts: Tensor,
        return_attention: bool = False,
    ) -> tuple[Tensor, KVCache, Tensor | None]:
        if not self.has_extend:
            if items.shape[1] != 1 or bool((counts != 1).any()):
                raise ValueError("this ONNX file holds step only: one event per user (re-export "
                                 "it with `kvrec export` for extend)")
            vectors, new_cache, attention = self.step(
                cache, items[:, 0], event_types[:, 0], return_attention
            )
            return (vectors.unsqueeze(1), new_cache,
                    attention.unsqueeze(1) if attention is not None else None)
        return self._run(cache, {
            "items": items.numpy().astype(np.int64),
            "event_types": event_types.numpy().astype(np.int64),
            "counts": counts.numpy().astype(np.int64),
        }, return_attention)


def make_backend(
    name: str, encoder: Encoder, *, onnx_path: Path | None = None, threads: int = 0
) -> StepBackend:
    if name == "torch-cpu":
        return TorchBackend(encoder, "cpu")
    if name == "torch-cuda":
        return TorchBackend(encoder, "cuda")
    if name == "onnx-cpu":
        if onnx_path is None:
            raise ConfigError("backend onnx-cpu needs the exported step (--onnx PATH)")
        return OnnxBackend(encoder, onnx_path, threads)
    raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
