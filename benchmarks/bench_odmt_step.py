"""One whole ODMT training step at the reference scale: our kernels against the PyTorch path.

The step is the example's (``examples/train_odmt.py``): IMT over the distinct items of the
batch (every position in ``triton_static``) -> three SASRecs -> three debiased in-batch CEs
+ distillation, backward, AdamW, bf16 autocast. Shapes follow
``../shared/anchors/odmt_step_gpu.py``: 128 users x 13 items, text 30 tokens, image 50 tokens
(width 768 each), d = 768, IMT 2 layers x 2 heads (head dim 384).

``backend="triton"`` runs the fused attention and loss kernels; ``backend="torch"`` the same
model with the PyTorch definitions (mask and logits materialised); ``triton_static`` the
kernels with the input value checks off (``ops.set_value_checks(False)``) and every position
encoded (``encode_distinct=False``; the distinct items' count is a read-back too): nothing in
the step waits for the device. Prints ms per step (median of CUDA-event-timed steps,
the device synchronised around each: idle gaps inside a step count, the host running ahead
of the device across steps cannot) and ms per step of the same steps run back to back (one
synchronisation at the end: the throughput of a loop without read-backs), and writes
``$OUT/bench_odmt_step.json`` when OUT is set.
Without a GPU it says so and exits 0; ``DRY=1`` runs tiny shapes on the CPU (plumbing only).
``CAPTURE=specs.json`` runs one step of the kernels' model with their launches recorded for
``benchmarks/precompile.py`` instead of compiled and launched (nothing timed).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_time import elapsed_ms  # noqa: E402

DRY = bool(os.environ.get("DRY"))
VARIANTS = ("torch", "triton", "triton_static")
CAPTURE = os.environ.get("CAPTURE", "")


def build(backend: str, device: torch.device, encode_distinct: bool = True):
    import train_odmt

    from odmt_components import leave_one_out, make_synthetic_dataset, popularity_log_q

    if DRY:
        shape = dict(n_users=16, n_items=40, n_topics=2, text_len=4, text_dim=8, image_tokens=2, image_dim=8)
        config = train_odmt.ODMTConfig(
            dim=16, batch_size=2, max_seq_len=3, backend=backend, encode_distinct=encode_distinct, progress=False
        )
    else:
        shape = dict(n_users=2000, n_items=6000, n_topics=40, text_len=30, text_dim=768, image_tokens=50, image_dim=768)
        config = train_odmt.ODMTConfig(backend=backend, encode_distinct=encode_distinct, progress=False)
    data = make_synthetic_dataset(max_len=20, **shape)
    split = leave_one_out(data)
    log_q = popularity_log_q(split.train, data.n_items).to(device)
    torch.manual_seed(0)
    model = train_odmt.build_model(config, data).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    from odmt_components import collate_train

    # Full-length sequences, like the anchor's 128 x 13 batch.
    long_enough = [s for s in split.train if len(s) >= config.max_seq_len + 1] or split.train
    batches = [
        collate_train(long_enough[i : i + config.batch_size], config.max_seq_len).to(device)
        for i in range(0, min(len(long_enough), 4 * config.batch_size), config.batch_size)
    ]
    return model, optimizer, batches, log_q


def time_steps(backend: str, device: torch.device, steps: int, encode_distinct: bool = True) -> dict:
    model, optimizer, batches, log_q = build(backend, device, encode_distinct)
    model.train()

    def step(batch):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = model.training_loss(batch, log_q, 0.5)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        return loss

    for i in range(1 if DRY or CAPTURE else 3):  # warm-up: kernel compilation, allocator
        step(batches[i % len(batches)])
    if CAPTURE:
        return {}
    times = [elapsed_ms(lambda i=i: step(batches[i % len(batches)]), device) for i in range(steps)]

    def run_all() -> None:
        for i in range(steps):
            step(batches[i % len(batches)])

    back_to_back = elapsed_ms(run_all, device) / max(steps, 1)
    peak = torch.cuda.max_memory_allocated() / 1e6 if device.type == "cuda" else 0.0
    rows = batches[0].target.numel()
    return {
        "ms_per_step": statistics.median(times),
        "ms_per_step_back_to_back": back_to_back,
        "peak_MB": peak,
        "rows": rows,
        "columns": batches[0].candidate_ids.numel(),
    }


def main() -> None:
    if not torch.cuda.is_available() and not DRY:
        print("bench_odmt_step: no CUDA GPU present; nothing measured (DRY=1 runs the plumbing on the CPU).")
        return
    if DRY:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cpu" if DRY else "cuda")
    if CAPTURE:  # record the kernels' compile requests of one step (benchmarks/precompile.py)
        import precompile

        precompile.capture(CAPTURE)
        time_steps("triton", device, 0)
        return
    from odmt_components import ops

    results: dict = {"device": "cpu (DRY)" if DRY else torch.cuda.get_device_name(), "torch": torch.__version__}
    steps = 1 if DRY else 30
    for variant in VARIANTS:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        static = variant.endswith("_static")
        ops.set_value_checks(not static)
        try:
            results[variant] = time_steps(variant.removesuffix("_static"), device, steps, encode_distinct=not static)
        except Exception as error:  # one failing variant must not hide the others' numbers
            results[variant] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        finally:
            ops.set_value_checks(True)
        print(variant, results[variant], flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "bench_odmt_step.json").write_text(json.dumps(results, indent=1))
    print("\n| ODMT training step | ms/step | ms/step back to back | peak MB |\n|---|---|---|---|")
    for variant in VARIANTS:
        r = results[variant]
        if "error" in r:
            print(f"| {variant} | failed: {r['error'][:80]} | | |")
        else:
            print(f"| {variant} | {r['ms_per_step']:.1f} | {r['ms_per_step_back_to_back']:.1f} | {r['peak_MB']:.0f} |")
    for variant in VARIANTS[1:]:
        if all("ms_per_step" in results[b] for b in ("torch", variant)):
            speedup = results["torch"]["ms_per_step"] / results[variant]["ms_per_step"]
            print(f"speed-up of {variant} on the whole step: {speedup:.2f}x")


if __name__ == "__main__":
    main()
