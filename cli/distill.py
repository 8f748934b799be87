"""`shrink distill STUDENT --teacher MODEL`: logit distillation with a cached teacher, resumable,
single-process or data parallel under `torchrun --no-python --nproc_per_node N shrink distill ...`."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from shrink.cli.inspect import MODEL_HELP
from shrink.cli.render import console, err_console, handle_user_errors, print_json
from shrink.cli.training import run_distillation


@handle_user_errors
def distill_command(
    student: str = typer.Argument(..., help="The student: " + MODEL_HELP),
    teacher: str = typer.Option(..., help="The teacher (usually the unpruned model)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the distilled student; checkpoints go to OUTPUT.checkpoints."),
    data: str = typer.Option(None, help="Training text: .txt/.jsonl/.parquet or a Hugging Face dataset; default: text the teacher writes itself (cached)."),
    loss: str = typer.Option("forward_kl", help="forward_kl, reverse_kl, jsd, skew_kl or taid."),
    steps: int = typer.Option(100, help="Optimizer steps."),
    batch_size: int = typer.Option(4, help="Sequences per optimizer step, over all processes and micro-batches."),
    grad_accum: int = typer.Option(1, help="Micro-batches per step (lowers peak memory, same result)."),
    seq_len: int = typer.Option(128, help="Tokens per sequence."),
    lr: float = typer.Option(1e-4, help="Peak AdamW learning rate, after warm-up; cosine decay follows. 1e-4 gave the lowest held-out KL for a 60%-pruned embedded model (benchmarks/prune_distill.py swept 1e-5, 1e-4, 3e-4)."),
    warmup_steps: int = typer.Option(None, help="Linear warm-up steps before the cosine decay; default 10% of --steps."),
    clip_norm: float = typer.Option(1.0, help="Gradient clipping norm."),
    precision: str = typer.Option("fp32", help="fp32, or bf16 autocast (faster on GPUs and on CPUs with native bf16)."),
    temperature: float = typer.Option(1.0, help="Softmax temperature of both distributions."),
    top_k: int = typer.Option(64, help="Teacher logits kept per position in the cache."),
    ce_weight: float = typer.Option(0.0, help="Weight of an extra cross-entropy term on the real next tokens."),
    hidden_weight: float = typer.Option(0.0, help="Weight of a hidden-state term (student layers matched to the teacher's at the same relative depth; runs the teacher live)."),
    eval_every: int = typer.Option(0, help="Steps between held-out evaluations (0: before and after only)."),
    checkpoint_every: int = typer.Option(25, help="Steps between checkpoints."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Distill a student towards a teacher on its logits, resumable after an interruption.

    The teacher runs once (top-k logits cached on disk); rerunning the same command after an
    interruption resumes from the last checkpoint. Under torchrun every process takes its share of
    each batch and the result is the single-process one.

    Example: shrink distill gemma-pruned --teacher gemma-3-270m --steps 200 -o gemma-pruned-distilled
    """
    from dataclasses import asdict

    from shrink.compress.data import prepare
    from shrink.compress.distill.parallel import main_rank_first, world
    from shrink.compress.distill.teacher import teacher_topk
    from shrink.compress.distill.trainer import DistillConfig
    from shrink.errors import ShrinkError
    from shrink.model import load, save_loaded

    config = DistillConfig(loss=loss, temperature=temperature, lr=lr, batch_size=batch_size, steps=steps,
                           top_k=top_k, ce_weight=ce_weight, hidden_weight=hidden_weight, warmup_steps=warmup_steps,
                           clip_norm=clip_norm, grad_accum=grad_accum, precision=precision, eval_every=eval_every,
                           checkpoint_every=checkpoint_every)
    config.check()
    current = world()
    if batch_size % current.size:
        raise ShrinkError(f"--batch-size {batch_size} does not split evenly over {current.size} processes.")
    with err_console.status(f"Loading {teacher} and {student}"):
        teacher_model = load(teacher)
        student_model = load(student)
    if teacher_model.spec.vocab_size != student_model.spec.vocab_size:
        raise ShrinkError("Teacher and student have different vocabularies; logit distillation needs the same one.")
    with main_rank_first(current):  # rank 0 writes the data and teacher caches, the others read them
        split = prepare(teacher_model, data, seq_len=seq_len)
        with err_console.status("Caching the teacher's top-k logits"):
            train_topk = teacher_topk(teacher_model.model, split.train, top_k)
            eval_topk = teacher_topk(teacher_model.model, split.evaluation, top_k)
    started = time.perf_counter()
    report = run_distillation(student_model.model, split, train_topk, eval_topk, config,
                              Path(f"{output}.checkpoints"), teacher=teacher_model.model if hidden_weight else None,
                              current=current)
    seconds = time.perf_counter() - started
    if current.is_main:
        save_loaded(student_model, output)
    current.finish()
    if not current.is_main:
        return
    if json_out:
        print_json({"output": str(output), "config": asdict(config), "report": asdict(report), "seconds": seconds,
                    "processes": current.size, "data": split.source, "measured": True})
        return
    before, after = report.eval_before, report.eval_after
    console.print(f"[bold]Distilled[/] {student} towards {teacher} -> {output}")
    console.print(f"{report.steps} steps, {report.tokens:,} tokens ({split.source}), {seconds:.0f} s measured, "
                  f"{report.tokens_per_second:,.0f} tokens/s measured on {current.size} process(es)"
                  + (f", resumed from step {report.resumed_from}" if report.resumed_from else ""))
    console.print(f"held-out, measured on {split.evaluation.shape[0]} sequences of {seq_len} tokens: "
                  f"KL(teacher || student) {before['kl']:.4f} -> {after['kl']:.4f}, "
                  f"perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f}")
