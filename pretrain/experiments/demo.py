"""`make demo`: data, training, evaluation and a plot in a few minutes, on a CPU or a GPU.

1. builds a sentencepiece tokenizer and token shards from the built-in corpus (the Python
   standard library's docstrings; data_pipeline.build_demo, reused when already built);
2. trains the tiny model with big learning in its generalist form (configs/experiment/demo.yaml:
   single stream, 512-token vocabulary, about 2.5 minutes on a CPU; experiment/demo_gpu.yaml, a
   wider model for longer, with a GPU);
3. evaluates the validation matrix (NLL per token and perplexity of joint, left-to-right, MLM,
   infilling, random big-learning, prefix and suffix tasks) against the same model untrained;
4. reports held-out infilling accuracy and left-to-right NLL against the untrained model and a
   unigram baseline, filled-in held-out spans and a sentence scored against its scrambled
   version (pretrain.experiments.demo_report);
5. writes the loss curves and the matrix to run_dir/training.png and prints where everything is.

Extra arguments are training overrides, e.g. `python -m pretrain.experiments.demo trainer.max_minutes=1`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# One OpenMP thread unless the user says otherwise, set before torch loads its OpenMP runtime:
# on a small shared CPU, 2 spinning threads per process ran the tiny config 20x slower than one
# (docs/benchmarks.md, Trainer). torchrun makes the same choice for its workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.experiments.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for pretrain.train")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print("demo: starting (importing torch and DeepSpeed takes a few seconds)", flush=True)
    import torch

    from ..checkpoint.card import format_matrix
    from ..checkpoint.loading import load_for_inference
    from ..checkpoint.rundir import last_eval
    from ..model import BigLearner
    from ..train.config import load_config
    from ..train.evaluate import eval_batches, evaluate, validation_windows
    from ..train.guard import TrainingError
    from ..train.plots import plot_run
    from ..train.run import train

    experiment = "demo_gpu" if torch.cuda.is_available() else "demo"
    try:
        config = load_config([f"experiment={experiment}", *args.overrides])
    except ValueError as err:
        print(f"pretrain.experiments.demo: error: {err}", file=sys.stderr)
        return 2
    t = config.trainer
    budget = f"up to {t.max_minutes:g} min or {t.max_steps} steps" if t.max_minutes > 0 else f"{t.max_steps} steps"
    print(f"demo: experiment={experiment} (configs/experiment/{experiment}.yaml), "
          f"{'GPU' if torch.cuda.is_available() else 'CPU'}, {budget} of training")
    try:
        summary = train(config)
    except (ValueError, TrainingError) as err:
        print(f"pretrain.experiments.demo: error: {err}", file=sys.stderr)
        return 1
    if summary.get("stopped") == "signal":
        print(f"demo: interrupted; checkpoint in {summary['checkpoint']}; run `make demo` again to continue")
        return 0

    print("demo: scoring held-out text with the trained model, the untrained one and a unigram model", flush=True)
    # The same fixed validation draws, scored by the model before any training: the trainer's
    # step-0 evaluation (a run started before it recorded one is scored here).
    trained, meta = load_for_inference(summary["checkpoint"], trust_checkpoint=True)  # this run's own
    torch.manual_seed(config.trainer.seed)
    untrained = BigLearner(trained.config).eval()
    windows = validation_windows(meta["manifest"], config.eval.batches, config.eval.batch_size or config.data.batch_size)
    from data_pipeline import load_manifest
    batches = eval_batches(windows, config.eval, int(load_manifest(meta["manifest"])["pad_id"]))
    baseline = last_eval(summary["run_dir"], 0) or evaluate(untrained.loss, batches, torch.device("cpu"))
    matrix = summary["eval"]
    from data_pipeline.tokenizer import Tokenizer

    from .demo_report import report

    tokenizer = Tokenizer.load(Path(meta["manifest"]).parent)  # the directory build_demo wrote
    text, numbers = report(trained, untrained, batches, matrix, baseline, meta["manifest"], tokenizer)
    (Path(summary["run_dir"]) / "demo_report.json").write_text(json.dumps(numbers, indent=2))
    plot = plot_run(summary["run_dir"], matrix, baseline)
    run_dir = summary["run_dir"]
    print(f"""
demo finished: {summary['step']} steps, {summary['tokens_seen']:,} tokens, {summary['minutes']:.1f} min

validation matrix (fixed seeded (S, T) draws; lower is better):
{format_matrix(matrix, baseline)}

{text}

where everything is:
  run directory      {run_dir}
  metrics (JSON)     {run_dir}/metrics.jsonl
  TensorBoard        tensorboard --logdir {run_dir}/tensorboard
  plot               {plot}
  checkpoint         {summary['checkpoint']}   (make demo again resumes; resume=never starts over)
  exported weights   {summary.get('export')}   (pretrain.infer.TextModel.load, biglearn score/complete)
  data + tokenizer   {meta['manifest']}

next:
  biglearn eval ckpt={run_dir}
  python -m pretrain.train experiment=demo trainer.max_minutes=10 run_dir={run_dir}_longer
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
