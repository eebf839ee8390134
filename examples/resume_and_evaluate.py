"""Train, resume and evaluate a run from Python instead of the command line.

``adaptau.train.train`` takes a ``TrainConfig`` (the fields are the CLI flags) and writes a
run folder; ``resume=`` continues it from its ``last.pt`` with a larger epoch budget, and
``evaluate_run`` re-evaluates its best checkpoint.

    python examples/resume_and_evaluate.py --out runs/example
"""

import argparse

from adaptau.train import TrainConfig, train
from adaptau.train.trainer import evaluate_run


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/example")
    ap.add_argument("--data", default="synthetic:num_users=800,num_items=500")
    args = ap.parse_args(argv)
    cfg = TrainConfig(
        data=args.data, out=args.out, epochs=2, dim=32, batch_size=512, negatives=64, warmup=1, progress="off"
    )
    first = train(cfg, overwrite=True)  # two epochs, then it stops
    print("after 2 epochs:", first["status"], first["valid"])
    cfg.epochs = 4  # a larger budget ...
    summary = train(cfg, resume=args.out)  # ... continues from last.pt
    print("after 4 epochs:", summary["status"], "best epoch", summary["best_epoch"])
    metrics = evaluate_run(args.out, checkpoint="best")  # {split: {metric: value}}
    return {"summary": summary, "metrics": metrics}


if __name__ == "__main__":
    main()
