#!/usr/bin/env python3
"""Flower + PyTorch running W1, the peer of `flotilla simulate --config examples/w1.toml`.

Never run in CI. Needs `pip install "flwr[simulation]" torch numpy` (Flower's simulation engine
runs on Ray). Usage:
    flotilla partition --config examples/w1.toml --json > /tmp/w1-partition.json
    python3 bench/flower_w1.py --partition /tmp/w1-partition.json [--rounds 20]
        [--data-dir /usr/share/datasets/fashion-mnist]

W1 as examples/w1.toml: Fashion-MNIST normalised with (x/255 - 0.2860)/0.3530; 100 clients
holding flotilla's partition (`--partition`: every client gets exactly the label histogram
flotilla gives it, drawn from a class-wise shuffle, so sizes and label skew match client for
client; without it, a plain per-class Dirichlet(0.5) split of numpy's); 10 clients per round; 1 local epoch, batch 32, SGD lr 0.01
momentum 0.9; the FedAvg CNN; the global model evaluated on the 10,000 test images after every
round. One Ray worker per core (`num_cpus = 1` per client, one torch thread each), as flotilla's
simulator runs one client per core. Prints the accuracy after every round, then
`wall_s` (the whole run, from start to the last evaluation) and `final_accuracy`.
"""
import argparse
import gzip
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import flwr as fl
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation

from pytorch_w1 import FedAvgCNN  # the same module as the bench's PyTorch side

MEAN, STD = 0.2860, 0.3530


def idx(path, offset):
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load(data_dir, split):
    images = idx(os.path.join(data_dir, f"{split}-images-idx3-ubyte.gz"), 16)
    labels = idx(os.path.join(data_dir, f"{split}-labels-idx1-ubyte.gz"), 8)
    x = (images.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))


def dirichlet(labels, clients, alpha, seed):
    """Per class, shares of its examples drawn from Dirichlet(alpha) over the clients."""
    rng = np.random.default_rng(seed)
    parts = [[] for _ in range(clients)]
    for c in range(10):
        ids = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(ids)).astype(int)[:-1]
        for k, chunk in enumerate(np.split(ids, cuts)):
            parts[k].extend(chunk.tolist())
    return [np.array(p, dtype=np.int64) for p in parts]


def from_histograms(labels, path, seed):
    """Clients with the label histograms of `flotilla partition --json`."""
    import json
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(10)]
    parts = []
    for client in json.load(open(path))["clients"]:
        part = []
        for c, count in enumerate(client["histogram"]):
            part.extend(pools[c][:count])
            pools[c] = pools[c][count:]
        parts.append(np.array(part, dtype=np.int64))
    return parts


def get_weights(model):
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def set_weights(model, weights):
    keys = model.state_dict().keys()
    model.load_state_dict({k: torch.from_numpy(np.copy(w)) for k, w in zip(keys, weights)})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--partition", help="JSON of `flotilla partition --json` (same clients)")
    a = p.parse_args()
    start = time.perf_counter()
    x_train, y_train = load(a.data_dir, "train")
    x_test, y_test = load(a.data_dir, "t10k")
    if a.partition:
        parts = from_histograms(y_train.numpy(), a.partition, 0)
        a.clients = len(parts)
    else:
        parts = dirichlet(y_train.numpy(), a.clients, 0.5, 0)
    torch.manual_seed(0)
    initial = get_weights(FedAvgCNN())

    class Client(NumPyClient):
        def __init__(self, part):
            self.part = part

        def fit(self, parameters, config):
            torch.set_num_threads(1)
            model = FedAvgCNN()
            set_weights(model, parameters)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            order = self.part[torch.randperm(len(self.part)).numpy()]
            model.train()
            for i in range(0, len(order), 32):
                b = order[i:i + 32]
                opt.zero_grad()
                F.cross_entropy(model(x_train[b]), y_train[b]).backward()
                opt.step()
            return get_weights(model), len(self.part), {}

    def client_fn(context: Context):
        return Client(parts[int(context.node_config["partition-id"])]).to_client()

    accuracy = []

    def evaluate(server_round, parameters, config):
        torch.set_num_threads(os.cpu_count())
        model = FedAvgCNN()
        set_weights(model, parameters)
        model.eval()
        correct, loss = 0, 0.0
        with torch.no_grad():
            for i in range(0, 10000, 1000):
                out = model(x_test[i:i + 1000])
                loss += F.cross_entropy(out, y_test[i:i + 1000], reduction="sum").item()
                correct += (out.argmax(1) == y_test[i:i + 1000]).sum().item()
        accuracy.append(correct / 10000)
        print(f"round {server_round}: accuracy {correct / 10000:.4f} loss {loss / 10000:.4f} "
              f"at {time.perf_counter() - start:.1f} s", flush=True)
        return loss / 10000, {"accuracy": correct / 10000}

    def server_fn(context: Context):
        strategy = FedAvg(
            fraction_fit=a.per_round / a.clients,
            min_fit_clients=a.per_round,
            fraction_evaluate=0.0,
            min_available_clients=a.clients,
            initial_parameters=ndarrays_to_parameters(initial),
            evaluate_fn=evaluate,
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=a.rounds))

    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=client_fn),
        num_supernodes=a.clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    print(f"flower {fl.__version__}, torch {torch.__version__}")
    print(f"wall_s: {time.perf_counter() - start:.1f}")
    print(f"final_accuracy: {accuracy[-1] if accuracy else float('nan'):.4f}")


if __name__ == "__main__":
    main()
