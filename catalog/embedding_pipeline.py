"""Batch embedding that keeps the accelerator busy: tokenise ahead on the CPU, run the model on
length-bucketed batches, copy results back asynchronously.

`SentenceTransformer.encode` tokenises each batch in the calling thread and then waits for the
model, so on a GPU the device idles while the CPU tokenises (FACTS.md: ~40k passages/s of forward
pass on an H100, ~3k/s end to end). Here:

- texts are sorted by length and cut into batches, so a batch pads to its own longest text, not to
  the corpus's (less wasted compute on short passages);
- a producer thread tokenises the next batches with the model's fast (Rust) tokenizer, which
  releases the GIL and spreads `encode_batch` over the cores, into pinned host memory, `prefetch`
  batches ahead of the device;
- the consumer moves each batch to the device without blocking, runs the transformer (half
  precision on CUDA), mean-pools and normalises on the device, and starts the copy of the vectors
  back while the next batch runs.

The same code runs on the CPU (fp32, no pinning), where the test suite checks it returns the
vectors of the plain path within 1e-6; `evals/bench_embedding.py` compares it with the
model's forward pass alone, measured in the same run.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["EmbeddingPipeline", "TokenBatch"]


@dataclass(frozen=True)
class TokenBatch:
    """One tokenised batch: positions in the caller's list, and the model inputs."""

    positions: npt.NDArray[np.int64]
    inputs: dict[str, Any]  # torch tensors, pinned when the device is CUDA


class EmbeddingPipeline:
    """Embeds many texts with a loaded sentence-transformers model (Transformer, mean Pooling, Normalize)."""

    def __init__(self, model: Any, model_dir: Path, device: str, *, batch_size: int = 256, prefetch: int = 3) -> None:
        """`model` is the SentenceTransformer the Embedder loaded (already on `device`, in half
        precision on CUDA); `model_dir` holds its `tokenizer.json`.

        Raises:
            ImportError: tokenizers is missing.
        """
        from tokenizers import Tokenizer

        self.device = device
        self.batch_size = batch_size
        self.prefetch = prefetch
        self._transformer = model[0].auto_model
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.enable_truncation(int(model.max_seq_length))
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest text of each batch

    def embed(self, texts: Sequence[str], *, batch_size: int | None = None) -> npt.NDArray[np.float32]:
        """Unit-length float32 vectors of `texts`, in their order."""
        import torch

        out = np.zeros((len(texts), int(self._transformer.config.hidden_size)), dtype=np.float32)
        if not texts:
            return out
        pending: list[tuple[npt.NDArray[np.int64], Any, Any]] = []  # positions, host tensor, copy-done event
        with torch.inference_mode():
            for batch in self._prefetched(texts, batch_size or self.batch_size):
                inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.inputs.items()}
                # Pool in fp32: a sum over 256 fp16 token vectors would lose digits.
                hidden = self._transformer(**inputs).last_hidden_state.float()
                mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                vectors = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
                if self.device.startswith("cuda"):
                    host = torch.empty(vectors.shape, dtype=torch.float32, pin_memory=True)
                    host.copy_(vectors, non_blocking=True)
                    done = torch.cuda.Event()  # type: ignore[no-untyped-call]
                    done.record()
                    pending.append((batch.positions, host, done))
                else:
                    out[batch.positions] = vectors.numpy()
            for positions, host, done in pending:
                done.synchronize()
                out[positions] = host.numpy()
        return out

    def forward_only(self, batches: Sequence[TokenBatch]) -> None:
        """Run the transformer over already tokenised, device-resident batches and wait for it:
        the ceiling the pipeline is measured against (no tokenising, no copies, no pooling)."""
        import torch

        with torch.inference_mode():
            for batch in batches:
                self._transformer(**batch.inputs)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()

    def on_device(self, batch: TokenBatch) -> TokenBatch:
        """`batch` with its inputs moved to the device (for `forward_only`)."""
        return TokenBatch(batch.positions, {k: v.to(self.device) for k, v in batch.inputs.items()})

    def batches(self, texts: Sequence[str], batch_size: int | None = None) -> Iterator[TokenBatch]:
        """The tokenised batches of `texts`, shortest texts first (also used by the benchmark)."""
        import torch

        size = batch_size or self.batch_size
        pin = self.device.startswith("cuda")
        order = np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")
        for start in range(0, len(order), size):
            positions = order[start : start + size]
            encodings = self._tokenizer.encode_batch([texts[i] for i in positions])
            inputs = {
                "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.int64),
                "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64),
                "token_type_ids": torch.tensor([e.type_ids for e in encodings], dtype=torch.int64),
            }
            if pin:
                inputs = {k: v.pin_memory() for k, v in inputs.items()}
            yield TokenBatch(positions, inputs)

    def _prefetched(self, texts: Sequence[str], batch_size: int) -> Iterator[TokenBatch]:
        """`batches(texts)` produced by a background thread, up to `prefetch` ahead."""
        ready: queue.Queue[TokenBatch | BaseException | None] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for batch in self.batches(texts, batch_size):
                    if stop.is_set():
                        return
                    ready.put(batch)
                ready.put(None)
            except BaseException as exc:  # handed to the consumer, which raises it
                ready.put(exc)

        producer = threading.Thread(target=produce, name="lakegate-tokenize", daemon=True)
        producer.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while producer.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    producer.join(timeout=0.05)
