"""`make demo`: a forward/backward of the tiny preset on a synthetic batch, printing the losses."""
import time

import torch

from pixelbert_dist.model import build_model


def synthetic_batch(batch: int = 4, text_len: int = 40, vocab: int = 512) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, text_len), generator=gen)
    masked = torch.rand(batch, text_len, generator=gen) < 0.15
    return {"images": torch.randn(batch, 3, 192, 256, generator=gen),
            "image_sizes": torch.tensor([[192, 256], [128, 200], [64, 64], [190, 100]][:batch]),
            "input_ids": ids, "attention_mask": torch.ones_like(ids),
            "mlm_labels": torch.where(masked, ids, -100), "itm_labels": torch.arange(batch) % 2}


def main() -> None:
    torch.manual_seed(0)
    model = build_model("tiny")
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = synthetic_batch()
    for step in range(5):
        start = time.perf_counter()
        out = model(batch)
        out["loss"].backward()
        optim.step()
        optim.zero_grad()
        print(f"step {step}: loss {out['loss'].item():.3f} mlm {out['mlm_loss'].item():.3f} "
              f"itm {out['itm_loss'].item():.3f} ({time.perf_counter() - start:.2f}s)")


if __name__ == "__main__":
    main()
