"""Single-process training through PSEmbedding on synthetic clicks with a learnable signal.

Property: ids whose hidden weights drive the click probability are learned by the table's own AdaGrad
during backward while torch.optim.Adam trains the dense part; held-out AUC rises well above 0.5, and the
table's show/click statistics count exactly the occurrences and clicks it was fed.
"""

import numpy as np
import torch
import torch.nn as nn

import torch_psembed as pse

SLOTS, VOCAB, DIM, BATCH, STEPS = 4, 300, 4, 256, 100


def auc(scores, labels):
    """Rank-based ROC AUC (Mann-Whitney U), ties averaged."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels, bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return (ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def test_auc_helper_against_known_values():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5
    assert auc([3, 2, 1], [1, 0, 0]) == 1.0


class Synthetic:
    """Clicks ~ Bernoulli(sigmoid(sum of the hidden weights of the instance's ids - 1)); slot s uses ids s*10**12 + v."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.weights = self.rng.normal(0.0, 1.2, size=(SLOTS, VOCAB))

    def batch(self, n):
        v = np.minimum(self.rng.zipf(1.3, size=(n, SLOTS)) - 1, VOCAB - 1)
        logit = self.weights[np.arange(SLOTS), v].sum(1) - 1.0
        clicks = (self.rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        ids = v + np.arange(SLOTS) * 10**12
        return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(clicks)


class Model(nn.Module):
    def __init__(self, table):
        super().__init__()
        self.emb = pse.PSEmbedding(table, output="lr_mf", slot=1)
        self.mlp = nn.Sequential(nn.Linear(SLOTS * DIM, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, ids):
        e = self.emb(ids)  # (B, SLOTS, 1 + DIM)
        return e[..., 0].sum(1) + self.mlp(e[..., 1:].flatten(1)).squeeze(1)


def test_training_lifts_auc_and_counts_statistics():
    torch.manual_seed(0)
    table = pse.SparseTable(
        pse.TableConfig(
            dim=DIM,
            accessor=pse.CtrAccessorConfig(embedx_threshold=2.0),
            lr_optimizer=pse.AdaGrad(learning_rate=0.1, initial_range=0.0),
            mf_optimizer=pse.AdaGrad(learning_rate=0.05, initial_range=0.01),
        )
    )
    model = Model(table)
    assert list(model.parameters()) == list(model.mlp.parameters())  # the embedding adds no parameters
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    data = Synthetic(seed=1)
    held_out = Synthetic(seed=1)  # the same hidden weights, other draws
    held_out.rng = np.random.default_rng(99)
    test_ids, test_clicks = held_out.batch(4000)

    model.eval()
    with torch.no_grad():
        auc_before = auc(model(test_ids).numpy(), test_clicks.numpy())
    model.train()
    total_clicks = 0.0
    all_ids = []
    for _ in range(STEPS):
        ids, clicks = data.batch(BATCH)
        total_clicks += float(clicks.sum())
        all_ids.append(ids.reshape(-1))
        with pse.feed(clicks=clicks):
            loss = nn.functional.binary_cross_entropy_with_logits(model(ids), clicks)
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.eval()
    n_before = len(table)
    with torch.no_grad():
        auc_after = auc(model(test_ids).numpy(), test_clicks.numpy())
    assert len(table) == n_before  # eval does not insert rows
    assert abs(auc_before - 0.5) < 0.05  # nothing learned yet: every id reads zeros
    print(f"AUC before {auc_before:.3f}, after {auc_after:.3f}")
    assert auc_after > 0.72, (auc_before, auc_after)

    keys, counts = np.unique(torch.cat(all_ids).numpy(), return_counts=True)
    stats = table.pull(torch.from_numpy(keys), with_stats=True)
    np.testing.assert_array_equal(stats[:, 0].numpy(), counts.astype(np.float32))
    # every instance's click is counted once per slot it has an id in (SLOTS ids per instance)
    assert float(stats[:, 1].sum()) == SLOTS * total_clicks
    assert table.stats()["keys_with_mf"] > 0
