"""Training throughput of the harness against a bare PyTorch loop, and against deepctr-torch.

For each model and batch size, three loops train on the same synthetic tensors for the same
number of epochs, each followed by one validation pass per epoch:

- bare: a hand-written loop (slice batches, forward, summed task losses, backward, Adam step);
- harness: the trial's own code path (MultiTaskModule, Lightning Trainer, TensorBatches, the
  best-epoch callback and per-epoch MLflow logging into a temporary SQLite store);
- deepctr: deepctr-torch's MMoE trained with its own ``fit`` (MMoE only; needs
  ``pip install deepctr-torch``).

Runs alternate between loops. Each repeat gives a ratio to the bare loop that ran just before it,
which cancels slow drifts in the load of a shared machine; the table reports the median over
repeats of throughputs (samples per second) and of those ratios.

Usage:
    python scripts/bench_throughput.py --batch-sizes 1024 128 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmark.tracking import RunLogger, default_tracking_uri, get_or_create_experiment
from benchmark.trial import BestEpoch, EpochMetricsLogger, _trainer, quiet_libraries
from datasets import MultiTaskData, TensorBatches
from datasets.synthetic import synthetic
from models import MODELS, fit_budget
from models.lightning import MultiTaskModule, task_loss


def build_model(name: str, data: MultiTaskData, budget: int, seed: int) -> torch.nn.Module:
    entry = MODELS.get(name)
    fit = fit_budget(entry, budget, data.input_dim, data.task_dims)
    torch.manual_seed(seed)
    return entry.factory(input_dim=data.input_dim, task_dims=data.task_dims, width=fit.width,
                         **fit.options)


def bare_loop(model: torch.nn.Module, data: MultiTaskData, batch_size: int, epochs: int) -> float:
    """Train with a plain loop; return training samples per second."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    train, val = data.splits["train"], data.splits["val"]
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        features, targets = train.features[order], [t[order] for t in train.targets]
        for start in range(0, len(train), batch_size):
            stop = start + batch_size
            outputs = model(features[start:stop])
            loss = sum(
                task_loss(task, output, target[start:stop], None)
                for task, output, target in zip(data.tasks, outputs, targets)
            )
            loss = loss + sum(getattr(model, "regularization_losses", dict)().values(), 0.0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for start in range(0, len(val), 4096):
                model(val.features[start:start + 4096])
    return epochs * len(train) / (time.perf_counter() - started)


def harness_loop(
    model: torch.nn.Module, data: MultiTaskData, batch_size: int, epochs: int, store: Path
) -> float:
    """Train through the trial's code path; return training samples per second."""
    uri = default_tracking_uri(store)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.create_run(get_or_create_experiment(client, "throughput", uri))
    module = MultiTaskModule(model, data.tasks, 1e-3)
    trainer = _trainer(epochs, [BestEpoch(), EpochMetricsLogger(RunLogger(client, run.info.run_id))])
    started = time.perf_counter()
    trainer.fit(
        module,
        train_dataloaders=TensorBatches(data.splits["train"], batch_size, shuffle=True, seed=0),
        val_dataloaders=TensorBatches(data.splits["val"], 4096),
    )
    return epochs * len(data.splits["train"]) / (time.perf_counter() - started)


def deepctr_loop(data: MultiTaskData, batch_size: int, epochs: int, width: int) -> float:
    """Train deepctr-torch's MMoE with its own ``fit``; return training samples per second."""
    from deepctr_torch.inputs import DenseFeat
    from deepctr_torch.models import MMOE

    columns = [DenseFeat("features", data.input_dim)]
    model = MMOE(columns, num_experts=8, expert_dnn_hidden_units=(width,),
                 gate_dnn_hidden_units=(), tower_dnn_hidden_units=(16,),
                 task_types=("regression", "regression"), task_names=("task1", "task2"))
    model.compile("adam", loss=["mse", "mse"])
    train, val = data.splits["train"], data.splits["val"]
    x = {"features": train.features.numpy()}
    y = torch.cat(train.targets, dim=1).numpy()
    validation = ({"features": val.features.numpy()}, torch.cat(val.targets, dim=1).numpy())
    started = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, validation_data=validation)
    return epochs * len(train) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS.names())
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1024, 128])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--budget", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--no-deepctr", action="store_true", help="skip deepctr-torch")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    quiet_libraries()
    data = synthetic(seed=0, correlation=0.5, n_train=args.n_train, n_val=2000, n_test=10)
    store = Path(tempfile.mkdtemp(prefix="throughput-"))

    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.n_train} training samples, "
          f"{args.epochs} epochs, budget {args.budget}, median of {args.repeats}")
    print("| model | batch | bare (samples/s) | harness (samples/s) | harness / bare "
          "| deepctr (samples/s) | deepctr / bare |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        for batch_size in args.batch_sizes:
            bare, harness, peer = [], [], []
            for repeat in range(args.repeats):
                bare.append(bare_loop(build_model(name, data, args.budget, repeat), data,
                                      batch_size, args.epochs))
                harness.append(harness_loop(build_model(name, data, args.budget, repeat), data,
                                            batch_size, args.epochs, store))
                if name == "mmoe" and not args.no_deepctr:
                    width = fit_budget(MODELS.get("mmoe"), args.budget, data.input_dim,
                                       data.task_dims).width
                    peer.append(deepctr_loop(data, batch_size, args.epochs, width))
            harness_ratio = statistics.median(h / b for h, b in zip(harness, bare))
            peer_cells = "| - | -"
            if peer:
                peer_ratio = statistics.median(p / b for p, b in zip(peer, bare))
                peer_cells = f"| {statistics.median(peer):,.0f} | {peer_ratio:.2f}"
            print(f"| {name} | {batch_size} | {statistics.median(bare):,.0f} | "
                  f"{statistics.median(harness):,.0f} | {harness_ratio:.2f} {peer_cells} |",
                  flush=True)


if __name__ == "__main__":
    main()
