"""`shrink distill STUDENT --teacher MODEL`: logit distillation with a cached teacher, resumable,
single-process or data parallel under `torchrun --no-python --nproc_per_node N shrink distill ...`.
The training is flows/steps.py's `distill`, the function a recipe's distill step calls."""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, replace
from pathlib import Path

import typer

from shrink.cli.inspect import MODEL_HELP
from shrink.cli.render import Spinner, console, handle_user_errors, print_json
from shrink.cli.training import cli_hooks, saved_by_main
from shrink.compress.data import local_file, read_texts
from shrink.compress.distill.parallel import choose_parallel, world
from shrink.flows import defaults
from shrink.flows.steps import distill, distill_config, load_model, prepare_split, teacher_logits
from shrink.flows.resources import check as check_resources
from shrink.flows.resources import distill_needs
from shrink.model import load_spec, save_loaded


@handle_user_errors
def distill_command(
    student: str = typer.Argument(..., help="The student: " + MODEL_HELP),
    teacher: str = typer.Option(..., help="The teacher (usually the unpruned model)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the distilled student; checkpoints go to OUTPUT.checkpoints."),
    teacher_load: str = typer.Option(None, help="Load the teacher through bitsandbytes: 8bit or nf4 (a teacher larger than memory; it only computes the cached top-k, or the hidden-state term)."),
    data: str = typer.Option(None, help="Training text: .txt/.jsonl/.parquet or a Hugging Face dataset; default: text the teacher writes itself (cached)."),
    loss: str = typer.Option(defaults.DISTILL_LOSS, help="forward_kl, reverse_kl, jsd, skew_kl or taid."),
    steps: int = typer.Option(None, help=f"Optimizer steps; default: {defaults.DISTILL_TOKENS:,} tokens' worth (batch size x sequence length per step)."),
    batch_size: int = typer.Option(defaults.BATCH_SIZE, help="Sequences per optimizer step, over all processes and micro-batches."),
    grad_accum: int = typer.Option(1, help="Micro-batches per step (lowers peak memory, same result)."),
    seq_len: int = typer.Option(defaults.SEQ_LEN, help="Tokens per sequence."),
    lr: float = typer.Option(defaults.DISTILL_LR, help="Peak AdamW learning rate, after warm-up; cosine decay follows. The default gave the lowest held-out KL for a 60%-pruned embedded model (benchmarks/prune_distill.py swept 1e-5, 1e-4, 3e-4; flows/defaults.py)."),
    warmup_steps: int = typer.Option(None, help="Linear warm-up steps before the cosine decay; default 10% of --steps."),
    clip_norm: float = typer.Option(1.0, help="Gradient clipping norm."),
    precision: str = typer.Option("fp32", help="fp32, or bf16 autocast (faster on GPUs and on CPUs with native bf16)."),
    temperature: float = typer.Option(1.0, help="Softmax temperature of both distributions."),
    top_k: int = typer.Option(64, help="Teacher logits kept per position in the cache."),
    ce_weight: float = typer.Option(0.0, help="Weight of an extra cross-entropy term on the real next tokens."),
    hidden_weight: float = typer.Option(0.0, help="Weight of a hidden-state term (student layers matched to the teacher's at the same relative depth; runs the teacher live)."),
    eval_every: int = typer.Option(0, help="Steps between held-out evaluations (0: before and after only)."),
    checkpoint_every: int = typer.Option(None, help=f"Steps between checkpoints; default: {defaults.CHECKPOINTS_PER_RUN} checkpoints per run."),
    parallel: str = typer.Option("auto", help="Under torchrun: ddp (the whole student in every process), fsdp (FSDP2: weights, gradients and optimizer state 1/N per process) or auto (fsdp when the training state would take over a quarter of one process's memory)."),
    activation_checkpointing: bool = typer.Option(False, "--activation-checkpointing", help="Recompute each layer's activations in the backward pass (less memory, same result, slower)."),
    logit_chunk: int = typer.Option(64, help="Positions per slice of the student's output projection in the loss (full-vocabulary logits are never held for more); 0: full logits."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Distill a student towards a teacher on its logits, resumable after an interruption.

    The teacher runs once (top-k logits cached on disk); rerunning the same command after an
    interruption resumes from the last checkpoint. Under torchrun every process takes its share of
    each batch and the result is the single-process one.

    Example: shrink distill gemma-pruned --teacher gemma-3-270m --steps 200 -o gemma-pruned-distilled
    """
    current = world()
    current.check_batch(batch_size)
    config = distill_config(seq_len=seq_len, loss=loss, temperature=temperature, lr=lr, batch_size=batch_size,
                            steps=steps, top_k=top_k, ce_weight=ce_weight, hidden_weight=hidden_weight,
                            warmup_steps=warmup_steps, clip_norm=clip_norm, grad_accum=grad_accum, precision=precision,
                            eval_every=eval_every, checkpoint_every=checkpoint_every, parallel=parallel,
                            activation_checkpointing=activation_checkpointing, logit_chunk=logit_chunk)
    if data and local_file(data) is not None:
        read_texts(data)  # a missing, unreadable or empty data file fails before two models load
    check_resources(distill_needs(load_spec(teacher), load_spec(student), batch_size, seq_len), output,
                    "This distillation")
    with Spinner() as spinner:
        hooks = cli_hooks(spinner)
        teacher_model = load_model(teacher, hooks, teacher_load, role="the teacher ")
        # sharded: only rank 0 reads the student's weights; the others receive their shards from it.
        # Rank 0 decides (auto reads each process's memory), and the trainer is told, so that it cannot
        # count its way to another mode
        sharded = current.from_main(choose_parallel(parallel, load_spec(student).param_counts().total, current) == "fsdp")
        if sharded:
            config = replace(config, parallel="fsdp")
        student_model = load_model(student, hooks, weights=current.is_main or not sharded)
        split = prepare_split(teacher_model, data, seq_len, hooks, current, student=student_model)
        topk = teacher_logits(student_model, teacher_model, split, config, hooks, current)
        if not config.hidden_weight:  # training reads the cached logits only: the teacher leaves memory
            teacher_model = replace(teacher_model, model=None, tokenizer=None)
            gc.collect()
        started = time.perf_counter()
        report = distill(student_model, teacher_model, split, config, Path(f"{output}.checkpoints"), hooks, current,
                         topk=topk)
    seconds = time.perf_counter() - started
    if not saved_by_main(current, lambda: save_loaded(student_model, output)):
        return
    if json_out:
        print_json({"output": str(output), "config": asdict(config), "report": asdict(report), "seconds": seconds,
                    "processes": current.size, "data": split.source, "measured": True})
        return
    before, after = report.eval_before, report.eval_after
    console.print(f"[bold]Distilled[/] {student} towards {teacher} -> {output}")
    console.print(f"{report.steps} steps, {report.tokens:,} tokens ({split.source}), {seconds:.0f} s measured, "
                  f"{report.tokens_per_second:,.0f} tokens/s measured on {current.size} process(es)"
                  + (f" ({report.parallel})" if current.size > 1 else "")
                  + (f", resumed from step {report.resumed_from}" if report.resumed_from else ""))
    console.print(f"held-out, measured on {split.evaluation.shape[0]} sequences of {seq_len} tokens: "
                  f"KL(teacher || student) {before['kl']:.4f} -> {after['kl']:.4f}, "
                  f"perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f}")
