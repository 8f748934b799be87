"""Per-process memory of the student's training state under FSDP2 with N processes (CPU, gloo), beside the
estimate 16 bytes a parameter / N (float32 weights, gradients and AdamW's two moments), the same plus the
largest FSDP2 unit held whole while it runs (compress/distill/parallel.sharded_state_bytes), and tokens/s
per process.

    python benchmarks/fsdp_memory.py [--processes 1,2,4] [--steps 4] [--hidden 768] [--layers 8]

The student is a random Llama (untied, vocabulary --vocab, 32,000 by default) sized so that its training state dominates a
process's memory; the teacher's top-k comes from a random teacher of the same shape (the figures are
about memory and speed, not quality). Each N runs `torchrun --nproc_per_node N` on this script; every
process samples its resident memory (/proc, every 20 ms) from the end of its first optimizer step to the
end of its last, so the figure is the training loop's, not the loading (here every process builds the
whole random student; `shrink distill` loads it on rank 0 only, the others its structure) nor the
gathering of the trained student after the last step (which rank 0 keeps and saves). "state" is that peak minus the process's
resident memory before the student was built. Every figure is measured except the labelled estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


class Sampler:
    def __init__(self):
        self.peak, self.running, self._stop = 0, False, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    @staticmethod
    def rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _watch(self):
        while not self._stop.is_set():
            if self.running:
                self.peak = max(self.peak, self.rss())
            time.sleep(0.02)

    def stop(self):
        self._stop.set()
        self._thread.join()


def child(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from transformers import LlamaConfig, LlamaForCausalLM

    from shrink.allocator import map_large_allocations
    from shrink.compress.distill.parallel import sharded_state_bytes, world
    from shrink.compress.distill.trainer import DistillConfig, distill

    map_large_allocations()  # as the shrink command does first
    torch.set_num_threads(1)
    current = world()
    sampler = Sampler()
    baseline = sampler.rss()
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=4,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, args.vocab, (8, args.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        top = torch.log_softmax(teacher(ids).logits, -1).topk(64, -1)
    del teacher
    student = LlamaForCausalLM(config)
    params = sum(p.numel() for p in student.parameters())
    estimate = sharded_state_bytes(student, current.size)

    steps = []

    def after_step(_optimizer, _args, _kwargs):
        # every process samples from the end of its first optimizer step to the end of its last: the
        # training loop, not the loading before it or the gathering of the full student after it
        steps.append(1)
        sampler.running = len(steps) < args.steps

    hook = register_optimizer_step_post_hook(after_step)
    distill_config = DistillConfig(steps=args.steps, batch_size=4, checkpoint_every=10 ** 9,
                                   parallel="fsdp" if current.size > 1 else "auto")
    report = distill(student, ids, (top.values, top.indices.int()), distill_config, Path(args.work) / f"n{current.size}",
                     current=current)
    hook.remove()
    sampler.stop()
    mine = {"rank": current.rank, "peak": sampler.peak, "baseline": baseline}
    everyone = [mine]
    if current.size > 1:
        everyone = [None] * current.size
        dist.all_gather_object(everyone, mine)
    if current.is_main:
        print(json.dumps({"processes": current.size, "params": params, "estimate": estimate, "parallel": report.parallel,
                          "tokens_per_s": report.tokens_per_second, "ranks": everyone}))
    current.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--work", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    work = args.work or tempfile.mkdtemp(prefix="shrink-fsdp-memory-")
    torchrun = shutil.which("torchrun")
    rows = []
    for n in (int(x) for x in args.processes.split(",")):
        shutil.rmtree(Path(work) / f"n{n}", ignore_errors=True)
        launch = [torchrun, "--standalone", "--nproc_per_node", str(n)] if n > 1 else [sys.executable]
        command = [*launch, __file__, "--child", "--steps", str(args.steps), "--hidden", str(args.hidden),
                   "--layers", str(args.layers), "--vocab", str(args.vocab), "--seq-len", str(args.seq_len), "--work", work]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(done.stdout[-3000:] + done.stderr[-3000:])
        result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
        rows.append(result)
        state = max(r["peak"] - r["baseline"] for r in result["ranks"])
        sharded_only = 16 * result["params"] / n
        print(f"N={n} ({result['parallel']}): {result['params'] / 1e6:.1f}M parameters; per-process training state "
              f"{state / 1e9:.2f} GB measured (largest over ranks; peak RSS {max(r['peak'] for r in result['ranks']) / 1e9:.2f} GB), "
              f"{sharded_only / 1e9:.2f} GB estimated for 16 B/parameter / N alone, {result['estimate'] / 1e9:.2f} GB "
              f"estimated with the largest unit held whole (compress/distill/parallel.sharded_state_bytes); "
              f"{result['tokens_per_s'] / n:,.0f} tokens/s per process measured", flush=True)


if __name__ == "__main__":
    main()
