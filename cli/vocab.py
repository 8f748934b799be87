"""`shrink trim-vocab`: keep the tokens a deployment's text uses (compress/vocab.py), slice the embedding
and output projection to them and rewrite the tokenizer; saved as a model directory. The step itself is
flows/vocab.py's `trim_vocab`; this module parses and renders."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from shrink.cli.inspect import MODEL_HELP
from shrink.cli.render import Spinner, console, handle_user_errors, print_json
from shrink.cli.training import cli_hooks
from shrink.compress.data import local_file
from shrink.flows import defaults
from shrink.flows.steps import load_model
from shrink.flows.vocab import check_trim_settings, trim_vocab
from shrink.model import save_loaded
from shrink.units import fmt_time


@handle_user_errors
def trim_vocab_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the trimmed model (Hugging Face layout)."),
    vocab: int = typer.Option(None, "--vocab", help="Tokens to keep in all (byte pieces and special tokens included), e.g. 16384."),
    vocab_coverage: float = typer.Option(None, "--vocab-coverage", help="Keep the fewest frequent tokens that cover this share of the calibration tokens, e.g. 0.999."),
    data: str = typer.Option(None, help="The deployment's text: .txt/.jsonl/.parquet or a Hugging Face dataset; default: text the model writes itself (cached)."),
    text_field: str = typer.Option("text", help="The text field of a .jsonl or .parquet file."),
    target: str = typer.Option(None, "--target", "-t", help="Hardware profile to estimate the decode time per token on, before and after (see `shrink profiles`)."),
    weights: str = typer.Option(None, help="Weight format the estimate costs, e.g. q8_0 for a GGUF deployment (default: the model's dtype)."),
    model_counts: bool = typer.Option(True, "--model-counts/--no-model-counts", help="Add the model's expected count of each token on the calibration text (one forward pass over it) to the counts that rank the vocabulary; off: counts, then merge rank."),
    seq_len: int = typer.Option(defaults.SEQ_LEN, help="Sequence length of the held-out text the original's outside mass is measured on."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Trim the vocabulary to the tokens the calibration text uses, and save the model.

    Every byte piece and special token stays, so any text is still encodable; the tokenizer is
    rewritten (Hugging Face and GGUF) so it never produces a removed token. Distil afterwards with
    `shrink distill OUT --teacher MODEL`: the teacher keeps its full vocabulary.

    Examples:

      shrink trim-vocab gemma-3-270m --vocab 16384 --target jetson-orin-nano -o gemma-16k

      shrink trim-vocab gemma-3-270m --vocab-coverage 0.999 --data my-texts.jsonl -o gemma-mine
    """
    check_trim_settings(vocab, vocab_coverage, target)
    if data:
        local_file(data)
    with Spinner() as spinner:
        hooks = cli_hooks(spinner)
        loaded = load_model(model, hooks)
        trimmed, report = trim_vocab(loaded, data, hooks, size=vocab, coverage=vocab_coverage, text_field=text_field,
                                     seq_len=seq_len, target=target, weights=weights, model_counts=model_counts)
    save_loaded(trimmed, output)
    if json_out:
        print_json({"output": str(output), **report, "spec": trimmed.spec.to_dict()})
        return
    held, mass = report["held_out"], report["outside_mass_measured"]
    table = Table(title=f"Trimmed {model} -> {output}", title_justify="left")
    for column in ("", "value"):
        table.add_column(column)
    table.add_row("vocabulary", f"{report['original_vocab']:,} -> {report['kept_vocab']:,} tokens "
                                f"({report['required']:,} byte pieces and special tokens always kept)")
    table.add_row("calibration tokens covered", f"{report['calibration_token_coverage']:.2%} of {report['calibration_tokens']:,} (measured)")
    table.add_row("held-out text unchanged", f"{held['token_coverage']:.2%} of {held['held_out_tokens']:,} tokens, "
                                             f"{held['documents_unchanged']:.0%} of {held['held_out_documents']} documents (measured)")
    table.add_row("original's mass outside", f"mean {mass['mean']:.4f}, max {mass['max']:.4f} over {mass['positions']:,} "
                                             "held-out positions (measured)")
    if "decode_estimate" in report:
        est = report["decode_estimate"]
        table.add_row(f"decode on {est['target']}", f"{fmt_time(est['tpot_s_before_estimated'])} -> "
                                                    f"{fmt_time(est['tpot_s_after_estimated'])} per token (estimated)")
    console.print(table)
    console.print(f"calibration text: {report['data']}; next: shrink distill {output} --teacher {model} -o {output}-distilled")
