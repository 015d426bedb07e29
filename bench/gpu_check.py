"""One-shot GPU check: exact mining with the torch backend, training and extract on one GPU.

Written for a lent machine with one NVIDIA H200 (16 cores, CUDA 13, torch, no FAISS, no
network) and at most 8 minutes of run time; it needs torch and this checkout only.
bench/GPU.md gives the one command and says how to read the numbers. Four parts, in this
order, each in its own child process under its own time budget (killed at it; what it had
measured is kept), each skippable, the JSON summary rewritten after every part:

1. mine (--skip-mine): --n x --d random float32 rows, --classes labels, k=16, our search
   (`DifferentLabelIndex(index="torch")`) vs an unconstrained exact self-search by the same
   engine on the same GPU; guarantee on every row, exactness on --sample queries against
   a float64 oracle, peak GPU memory, other candidate precisions as time allows.
2. mine_big (--skip-mine-big): --big-n x --big-d, ours only, as far as the budget goes.
3. train (--skip-train): a CREMA-D-sized fixture, Joint and MIDAS with ResNet-18 encoders
   (--encoder), --epochs each at every --workers: stream alone, compute alone, end to end
   with the GPU utilisation sampled, the MIDAS/Joint step-time ratio and the bottleneck.
4. extract (--skip-extract): the `extract` warm-up on the GPU for the same fixture.
The modules under bench/gpu/ hold each concern (bench/gpu/__init__.py lists them).

Run (GPU machine):   python3 bench/gpu_check.py --out $OUT/gpu_check.json
Rehearsal (any CPU): .venv/bin/python bench/gpu_check.py --cpu-smoke   (tiny sizes)
Exit 0 when every part that ran is "ok"; 1 when a check failed or a part errored; 2 when a
part stopped early or timed out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not

from bench.gpu.harness import Report, environment, jsonable, run_part, use_checkout, write_json  # noqa: E402

PARTS = ("mine", "mine_big", "train", "extract")
# Sizes of the full check and of the CPU rehearsal; flags given override both. The budgets
# add up to the time limit; a part that finishes early leaves its seconds to the next.
FULL = {"n": 1_000_000, "d": 512, "classes": 10, "k": 16, "sample": 10_000, "chunks": 8,
        "precision": "auto", "chunk_size": None, "variants": "bf16,fp32",
        "variant_queries": 100_000, "big_n": 10_000_000, "big_d": 128, "big_sample": 1000,
        "clips": 7442, "frames": 3, "frame_size": 112, "n_mels": 128, "audio_frames": 300,
        "batch_size": 64, "epochs": 2, "warmup": 1, "workers": "0,8", "methods": "joint,midas",
        "extract_epochs": 2, "encoder": "resnet18", "device": "cuda", "mine_budget": 120.0, "mine_big_budget": 80.0,
        "train_budget": 180.0, "extract_budget": 70.0, "time_limit": 470.0}
SMOKE = {**FULL, "n": 3000, "d": 64, "sample": 300, "chunks": 4, "variants": "bf16",
         "variant_queries": 500, "big_n": 10_000, "big_d": 32, "big_sample": 200, "clips": 96,
         "frames": 1, "frame_size": 32, "n_mels": 32, "audio_frames": 48, "batch_size": 16,
         "workers": "0,2", "extract_epochs": 1, "encoder": "small_cnn", "device": "cpu", "mine_budget": 100.0,
         "mine_big_budget": 60.0, "train_budget": 240.0, "extract_budget": 100.0,
         "time_limit": 520.0}


def part_function(name: str):
    from bench.gpu import extract_warmup, mining, training

    return {"mine": mining.part_mine, "mine_big": mining.part_mine_big,
            "train": training.part_train, "extract": extract_warmup.part_extract}[name]


def child_main(a) -> int:
    budget = float(a._budget)
    rep = Report(a._part, Path(a._result), budget, margin=min(10.0, 0.1 * budget))
    if a.cpu_smoke:  # a loaded 2-core machine: more than one thread per op only waits
        import torch

        torch.set_num_threads(1)
    try:
        part_function(a._part)(a, rep)
        rep.data.pop("phase", None)
        rep.save()
    except Exception as e:
        traceback.print_exc()
        rep.set("status", "error")
        rep.set("error", f"{type(e).__name__}: {e}")
        return 1
    return 0


def summary_lines(parts: dict) -> list[str]:
    out = []
    m = parts.get("mine", {})
    if m.get("timing"):
        tm, c = m["timing"], m["config"]
        part = "" if tm["complete"] else f" (first {tm['queries']} queries only)"
        ex = m.get("exactness", {})
        mem = m.get("gpu_memory_gib", {})
        out.append(f"mine{part}: {c['n']} x {c['d']}, k={c['k']}: ours {tm['ours']['total_s']:.2f} s "
                   f"(build {tm['ours']['build_s']:.2f} + search {tm['ours']['search_s']:.2f}), "
                   f"unconstrained {tm['unconstrained']['total_s']:.2f} s -> ratio "
                   f"{tm.get('ratio_total', float('nan')):.3f} total, "
                   f"{tm.get('ratio_search', float('nan')):.3f} search; exact on "
                   f"{ex.get('queries')} sampled queries: {ex.get('exact')}; peak GPU memory "
                   f"{mem.get('ours_search_peak')} GiB; {tm['stats']}")
    b = parts.get("mine_big", {})
    if b.get("timing"):
        tm, c = b["timing"], b["config"]
        out.append(f"mine_big: {c['n']} x {c['d']}: {tm['queries']} queries in {tm['search_s']:.1f} s "
                   f"(+ build {tm['build_s']:.1f} s); all rows ~{tm.get('projected_all_s') or 0:.0f} s"
                   f"; exact on sample: {b.get('exactness', {}).get('exact')}")
    v = parts.get("train", {}).get("verdict", {})
    for key, d in v.items():
        out.append(f"train: {d['text']}" if isinstance(d, dict) else f"train: {key} = {d:.3f}")
    e = parts.get("extract", {}).get("extract")
    if e:
        out.append(f"extract: warm-up + features {e['wall_s']:.1f} s")
    for name, p in parts.items():
        out.append(f"{name}: {p.get('status')}" + (f" ({p['error']})" if p.get("error") else "")
                   + (f" [{'; '.join(p['stopped_early'])}]" if p.get("stopped_early") else ""))
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny sizes on the CPU (a rehearsal of the script itself)")
    for p in PARTS:
        ap.add_argument(f"--skip-{p.replace('_', '-')}", action="store_true", help=f"skip part {p}")
    g = ap.add_argument_group("parts 1-2: exact mining (torch backend)")
    g.add_argument("--n", type=int, help="rows (1M)")
    g.add_argument("--d", type=int, help="dimension (512)")
    g.add_argument("--classes", type=int, help="labels, uniform (10)")
    g.add_argument("--k", type=int, help="neighbours per query (16)")
    g.add_argument("--sample", type=int, help="queries checked against the float64 oracle (10000)")
    g.add_argument("--chunks", type=int, help="query chunks, alternated ABBA (8)")
    g.add_argument("--precision", help="candidate pass: auto (tf32 on CUDA), fp32, tf32, bf16")
    g.add_argument("--chunk-size", type=int, help="database rows per product (the library's default)")
    g.add_argument("--variants", help="other precisions timed on --variant-queries (bf16,fp32)")
    g.add_argument("--variant-queries", type=int, help="queries per precision variant (100000)")
    g.add_argument("--big-n", type=int, help="part 2 rows (10M)")
    g.add_argument("--big-d", type=int, help="part 2 dimension (128)")
    g.add_argument("--big-sample", type=int, help="part 2 queries checked against the oracle (1000)")
    g = ap.add_argument_group("parts 3-4: training and extract")
    g.add_argument("--clips", type=int, help="fixture clips (7442, CREMA-D's count)")
    g.add_argument("--frames", type=int, help="visual frames per clip (3, the cremad reader's)")
    g.add_argument("--frame-size", type=int, help="frame side in pixels (112; the reader's 224)")
    g.add_argument("--n-mels", type=int, help="spectrogram mel bands (128)")
    g.add_argument("--audio-frames", type=int, help="spectrogram frames (300)")
    g.add_argument("--batch-size", type=int, help="anchors per batch (64, the cremad preset's)")
    g.add_argument("--epochs", type=int, help="epochs per run (2)")
    g.add_argument("--warmup", type=int, help="MIDAS warm-up epochs (1)")
    g.add_argument("--workers", help="DataLoader workers to try, comma-separated (0,8)")
    g.add_argument("--methods", help="trainer methods, comma-separated (joint,midas)")
    g.add_argument("--extract-epochs", type=int, help="extract warm-up epochs (2)")
    g.add_argument("--encoder", help="encoder of both modalities (resnet18; the rehearsal: "
                   "small_cnn, which a CPU runs in seconds)")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="TrainConfig.deterministic (the trainer's default: on)")
    g = ap.add_argument_group("device, time and output")
    g.add_argument("--device", help="torch device of every part (cuda)")
    g.add_argument("--time-limit", type=float, help="seconds for the whole script (470)")
    for p in PARTS:
        g.add_argument(f"--{p.replace('_', '-')}-budget", type=float,
                       help=f"seconds for part {p} at most ({FULL[p + '_budget']:.0f})")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--work", default="/tmp/midas_gpu_check", help="scratch folder (fixture, runs)")
    g.add_argument("--out", default="out/gpu_check.json", help="JSON summary")
    ap.add_argument("--_part", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    ap.add_argument("--_budget", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    for key, value in (SMOKE if a.cpu_smoke else FULL).items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    use_checkout()
    if a._part:
        return child_main(a)
    t_start = time.monotonic()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    print("environment: " + json.dumps(env), flush=True)
    summary = {"script": "bench/gpu_check.py", "argv": argv, "cpu_smoke": a.cpu_smoke,
               "environment": env, "parts": {}}
    parts = summary["parts"]
    spare = 0.0  # seconds earlier parts left unused
    for part in PARTS:
        if getattr(a, f"skip_{part}"):
            parts[part] = {"status": "skipped", "message": f"--skip-{part.replace('_', '-')}"}
            continue
        left = a.time_limit - (time.monotonic() - t_start) - 5
        own = getattr(a, f"{part}_budget")
        budget = min(own + spare, left)
        if budget < 20:
            parts[part] = {"status": "skipped", "message": (
                f"out of time: {left:.0f} s of the {a.time_limit:.0f} s limit left")}
            print(f"[{part}] SKIPPED: {parts[part]['message']}", flush=True)
            continue
        print(f"[{part}] starting, budget {budget:.0f} s", flush=True)
        t = time.monotonic()
        parts[part] = run_part(part, argv, budget, work, a.cpu_smoke)
        spare = max(0.0, budget - (time.monotonic() - t))
        summary["total_s"] = time.monotonic() - t_start
        write_json(Path(a.out), summary)  # after every part: a killed run keeps the parts done
    ran = [p["status"] for p in parts.values() if p["status"] != "skipped"]
    code = 1 if any(s in ("failed", "error") for s in ran) else (
        2 if any(s in ("partial", "timeout") for s in ran) else 0)
    summary.update(total_s=time.monotonic() - t_start, exit_code=code)
    summary["summary"] = lines = summary_lines(parts)
    write_json(Path(a.out), summary)
    print(json.dumps(jsonable(summary), indent=1))
    print("\n".join(["", "== summary =="] + lines))  # last: the tail of a log
    print(f"written to {a.out}; exit {code}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
