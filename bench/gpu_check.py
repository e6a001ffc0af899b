"""The kernels on a real GPU at Qwen2-7B's shapes: accuracy, and what one SRGen correction costs next to a decode step.

    python bench/gpu_check.py            # one CUDA GPU, CUDA PyTorch + triton + transformers; sized for < 5 min, H100
    python bench/gpu_check.py --small    # tiny shapes, runs anywhere (on CPU through Triton's interpreter)

Needs neither vLLM nor refine installed: kernels/srgen_loss.py and kernels/distribution_stats.py are loaded by path.
1. accuracy: the Triton kernels against float64 PyTorch references (d=3584, V=152064);
2. one SRGen correction (3 AdamW steps, each one srgen_loss_and_grad, then the corrected logits row) with the LM
   head in float32 and in bfloat16, at 4096 and 32768 context tokens, float32 matmul precision "highest" as in vLLM;
3. one decode step of a random-weight Qwen2-7B-shaped model (transformers, bfloat16) at the same context lengths,
   and the ratio correction / decode step.
Writes $OUT/gpu_check.json if OUT is set, else bench/results/gpu_check.json (gpu_check_small.json with --small).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FULL = {
    "dim": 3584,
    "vocab": 152064,
    "rows": 64,
    "positions": 512,
    "contexts": [4096, 32768],
    "layers": 28,
    "heads": 28,
    "kv_heads": 4,
    "intermediate": 18944,
    "runs": 3,
}
SMALL = {
    "dim": 64,
    "vocab": 1000,
    "rows": 8,
    "positions": 64,
    "contexts": [256, 1024],
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "intermediate": 128,
    "runs": 3,
}
# SRGen's defaults (policies/srgen.py): steps, learning rate, entropy weight; T as in the quality runs.
STEPS, LR, LAM, TEMPERATURE = 3, 0.01, 0.05, 0.6


def load_kernel(name: str):
    """kernels/<name>.py as a module, by file path: refine is not installed, and putting the repo root on sys.path
    would let kernels/ shadow Hugging Face's `kernels` package, which transformers may import."""
    spec = importlib.util.spec_from_file_location(f"refine_kernels_{name}", ROOT / "kernels" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # @triton.jit and dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(fn, runs: int, warmup: int = 1) -> float:
    """Median wall time of fn() over `runs` calls after `warmup` calls, the device synchronised around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def lm_head(shape: dict, device: str, seed: int = 0) -> torch.Tensor:
    """A random bfloat16 LM head [V, d] scaled so that unit-variance hidden states give logits of std 3."""
    gen = torch.Generator(device).manual_seed(seed)
    weight = torch.randn(shape["vocab"], shape["dim"], generator=gen, device=device) * (3 / shape["dim"] ** 0.5)
    return weight.bfloat16()


def rounded(obj):
    """obj with every float rounded to 3 significant digits, for printing."""
    if isinstance(obj, dict):
        return {key: rounded(value) for key, value in obj.items()}
    return float(f"{obj:.3g}") if isinstance(obj, float) else obj


def errors(got: torch.Tensor, expected: torch.Tensor) -> dict:
    """Max absolute error and max error relative to the largest reference value, as plain floats."""
    diff = (got.double() - expected).abs().max().item()
    return {"max_abs": diff, "max_rel": diff / max(expected.abs().max().item(), 1e-30)}


def check_accuracy(sl, ts, shape: dict, device: str) -> dict:
    """The Triton kernels against float64 references written from the definitions.

    token_stats on `rows` rows of float32 logits at T = 0.7; srgen_loss_and_grad_triton on `positions` positions
    with the same bfloat16-valued head passed as float32 and as bfloat16: the float64 reference uses those exact
    weights, so the bfloat16 errors are what the 16-bit GEMMs add, not the rounding of the head itself.
    """
    weight = lm_head(shape, device)
    gen = torch.Generator(device).manual_seed(1)
    logits = torch.randn(shape["rows"], shape["dim"], generator=gen, device=device) @ weight.float().T
    p = torch.softmax(logits.double() / 0.7, dim=-1)
    entropy = -torch.xlogy(p, p).sum(-1)
    varentropy = (p * (torch.log(p) + entropy[:, None]) ** 2).sum(-1)
    top2 = p.topk(2, dim=-1).values
    expected = {"entropy": entropy, "varentropy": varentropy, "margin": top2[:, 0] - top2[:, 1]}
    got = ts.token_stats_triton(logits, 0.7)
    result = {"token_stats": {name: errors(g, e) for (name, e), g in zip(expected.items(), got)}}

    hidden = torch.randn(shape["positions"], shape["dim"], generator=gen, device=device)
    targets = torch.randint(0, shape["vocab"], (shape["positions"] - 1,), generator=gen, device=device)
    delta = torch.randn(shape["dim"], generator=gen, device=device).mul(0.1).double().requires_grad_()
    z = (hidden.double() + delta) @ weight.double().T
    log_p = torch.log_softmax(z[-1] / TEMPERATURE, dim=-1)
    loss = (1 - LAM) * torch.nn.functional.cross_entropy(z[:-1], targets) - LAM * (log_p.exp() * log_p).sum()
    loss.backward()
    for name, w in (("srgen_fp32_weight", weight.float()), ("srgen_bf16_weight", weight)):
        got_loss, got_grad = sl.srgen_loss_and_grad_triton(hidden, delta.detach().float(), w, targets, TEMPERATURE, LAM)
        result[name] = {
            "loss": errors(got_loss, loss.detach()),
            "grad": errors(got_grad, delta.grad),
            "grad_norm_rel": ((got_grad.double() - delta.grad).norm() / delta.grad.norm()).item(),
        }
    return result


def correction(sl, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One SRGen correction as policies/srgen.py's reflect() runs it for one request: STEPS AdamW steps on delta,
    each from one srgen_loss_and_grad over the whole context, then the corrected logits of the last position."""
    delta = torch.zeros(hidden.shape[1], device=hidden.device, requires_grad=True)
    optimizer = torch.optim.AdamW([delta], lr=LR, weight_decay=1e-8, eps=1e-5)
    for _ in range(STEPS):
        _, delta.grad = sl.srgen_loss_and_grad(hidden, delta.detach(), weight, targets, TEMPERATURE, LAM)
        optimizer.step()
    return sl.srgen_logits_row(hidden[-1], delta.detach(), weight)


def time_corrections(sl, shape: dict, device: str) -> dict:
    """Median time of one correction for each head dtype and context length; hidden states are float32 [L, d]
    (reflect() upcasts the engine's), cast to bfloat16 inside the GEMMs when the head is bfloat16."""
    weight_bf16 = lm_head(shape, device)
    result = {}
    for dtype_name, weight in (("fp32", weight_bf16.float()), ("bf16", weight_bf16)):
        for context in shape["contexts"]:
            hidden = torch.randn(context, shape["dim"], device=device)
            targets = torch.randint(0, shape["vocab"], (context - 1,), device=device)
            seconds = median_seconds(functools.partial(correction, sl, hidden, weight, targets), shape["runs"])
            gemm_flops = STEPS * 2 * context * shape["vocab"] * shape["dim"]  # the logits GEMMs dominate
            result[f"{dtype_name}_{context}"] = {"seconds": seconds, "logits_gemm_tflops": gemm_flops / seconds / 1e12}
    return result


def time_decode(shape: dict, device: str) -> dict:
    """Median time of one decode step (batch 1) of a random Qwen2-7B-shaped model in bfloat16 with transformers,
    its KV cache filled with random keys / values of each context length and cut back after every step.
    Eager transformers adds Python and launch overhead and a KV-cache concatenation that vLLM's step does not
    have, so `roofline_seconds` (weights + KV cache read once at the measured copy bandwidth) is given too."""
    from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=shape["dim"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        vocab_size=shape["vocab"],
        max_position_embeddings=2 * max(shape["contexts"]),
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # initialised in place, in bfloat16: no float32 copy of 7.6B weights
            model = Qwen2ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = shape["dim"] // shape["heads"]
    bandwidth = copy_bandwidth(param_bytes // 8, device)
    result = {"param_bytes": param_bytes, "copy_bandwidth_gb_s": bandwidth / 1e9}
    token = torch.tensor([[1]], device=device)
    for context in shape["contexts"]:
        cache = DynamicCache()
        for layer in range(shape["layers"]):
            kv = [
                torch.randn(1, shape["kv_heads"], context, head_dim, dtype=torch.bfloat16, device=device)
                for _ in range(2)
            ]
            cache.update(*kv, layer)
        step = functools.partial(decode_step, model, token, cache, context)
        kv_bytes = 2 * shape["layers"] * shape["kv_heads"] * context * head_dim * 2
        result[str(context)] = {
            "seconds": median_seconds(step, 10, warmup=2),
            "roofline_seconds": (param_bytes + kv_bytes) / bandwidth,
        }
        del step, cache
    del model
    return result


def copy_bandwidth(elements: int, device: str) -> float:
    """Bytes per second a device copy of `elements` bfloat16 values moves, read and write counted."""
    src = torch.empty(elements, dtype=torch.bfloat16, device=device)
    return 2 * src.numel() * 2 / median_seconds(lambda: torch.empty_like(src).copy_(src), 5)


def decode_step(model, token: torch.Tensor, cache, context: int) -> None:
    """One decode step over `context` cached tokens."""
    with torch.no_grad():
        model(input_ids=token, past_key_values=cache, use_cache=True)
    cache.crop(-1)  # drop the new token: every step sees `context` cached tokens
    assert cache.get_seq_length() == context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes: a CPU-runnable check of this script")
    args = parser.parse_args()
    shape = SMALL if args.small else FULL
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.small:
        sys.exit("no CUDA device: run with --small for a CPU check of this script")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated, i.e. on loading
    torch.backends.cuda.matmul.allow_tf32 = False  # as vLLM: float32 GEMMs in full float32
    torch.set_float32_matmul_precision("highest")
    sl, ts = load_kernel("srgen_loss"), load_kernel("distribution_stats")

    import transformers

    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": sl.triton.__version__ if sl.triton else None,
        "transformers": transformers.__version__,
        "small": args.small,
        "shape": shape,
        "srgen": {"steps": STEPS, "lr": LR, "lam": LAM, "T": TEMPERATURE, "hidden_dtype": "float32"},
    }
    print({k: report[k] for k in ("device", "torch", "triton", "transformers", "small")}, flush=True)

    if sl.triton is None:
        print("triton is not installed: accuracy checks skipped", flush=True)
    else:
        report["accuracy"] = check_accuracy(sl, ts, shape, device)
        for name, value in report["accuracy"].items():
            print(f"accuracy {name}: {rounded(value)}", flush=True)
    report["correction"] = time_corrections(sl, shape, device)
    if device == "cuda":
        torch.cuda.empty_cache()
    report["decode"] = time_decode(shape, device)
    ratios = report["ratio_correction_over_decode"] = {}
    for key, value in report["correction"].items():  # key: "<head dtype>_<context>"
        decode = report["decode"][key.split("_")[1]]
        ratios[key] = {
            "vs_hf_eager_step": value["seconds"] / decode["seconds"],
            "vs_roofline_step": value["seconds"] / decode["roofline_seconds"],
        }
    for name in ("correction", "decode", "ratio_correction_over_decode"):
        for key, value in report[name].items():
            print(f"{name} {key}: {rounded(value)}", flush=True)

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("gpu_check_small.json" if args.small else "gpu_check.json")
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
