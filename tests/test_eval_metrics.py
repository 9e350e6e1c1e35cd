"""Held-out loss by token kind, rank-based ROC AUC and spread over seeds, against hand
computations and float64 brute force."""

import itertools
import math

import numpy as np
import pytest
import torch

from megatron_prior.data.kinds import KIND_IDS, KIND_NAMES
from megatron_prior.eval.auc import average_ranks, kind_separation_auc, roc_auc
from megatron_prior.eval.kind_losses import kind_loss_sums, kind_mean_losses
from megatron_prior.eval.stats import paired_differences, spread

G, T, U, O = (KIND_IDS[k] for k in ("grounded", "template", "unrelated", "other"))


def test_loss_by_kind_by_hand():
    ce = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [4.0, 0.5, 0.25, 9.0]])
    kinds = torch.tensor([[G, T, G, U], [T, T, G, O]], dtype=torch.uint8)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.float32)  # NaN sits under the mask
    got = kind_mean_losses(kind_loss_sums(ce, kinds, mask))
    assert got == pytest.approx({"grounded": (1 + 3 + 0.25) / 3, "template": (2 + 4 + 0.5) / 3}, abs=1e-12)
    assert "unrelated" not in got and "other" not in got


def test_sums_add_across_batches_like_one_batch():
    g = torch.Generator().manual_seed(0)
    ce = torch.rand(6, 50, generator=g, dtype=torch.float64) * 5
    kinds = torch.randint(0, len(KIND_NAMES), (6, 50), generator=g)
    mask = (torch.rand(6, 50, generator=g) > 0.2).float()
    whole = kind_loss_sums(ce, kinds, mask)
    parts = sum(kind_loss_sums(ce[i:i + 2], kinds[i:i + 2], mask[i:i + 2]) for i in range(0, 6, 2))
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-12)
    expected = {name: ce[(kinds == k) & (mask == 1)].mean().item() for k, name in enumerate(KIND_NAMES)}
    assert kind_mean_losses(whole) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("ce,kinds,mask,message", [
    (torch.ones(3), torch.zeros(4, dtype=torch.long), torch.ones(3), "one shape"),
    (torch.ones(3), torch.tensor([0, 1, 7]), torch.ones(3), "kind ids"),
    (torch.ones(3), torch.zeros(3), torch.ones(3), "integer"),
    (torch.ones(3), torch.zeros(3, dtype=torch.long), torch.tensor([1.0, 0.5, 1.0]), "0 and 1"),
    (torch.tensor([1.0, float("inf"), 1.0]), torch.zeros(3, dtype=torch.long), torch.ones(3), "not finite"),
])
def test_bad_loss_inputs_are_refused(ce, kinds, mask, message):
    with pytest.raises(ValueError, match=message):
        kind_loss_sums(ce, kinds, mask)


def test_auc_by_hand_with_ties():
    # Positives 0.9, 0.5, 0.5 against negatives 0.5, 0.1: of the 6 pairs, 4 are won and 2 tie.
    assert roc_auc([0.9, 0.5, 0.5, 0.5, 0.1], [1, 1, 1, 0, 0]) == pytest.approx(5 / 6, abs=1e-15)
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])).tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]
    assert roc_auc([1, 2, 3], [0, 1, 1]) == 1.0
    assert roc_auc([1, 2, 3], [1, 0, 0]) == 0.0
    assert roc_auc([7, 7, 7, 7], [1, 0, 1, 0]) == 0.5


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_brute_force_pair_count(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 80).astype(float)  # many ties
    labels = rng.random(80) < 0.4
    pos, neg = scores[labels], scores[~labels]
    brute = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    assert roc_auc(scores, labels) == pytest.approx(brute / (len(pos) * len(neg)), abs=1e-12)


def test_kind_separation_auc_selects_kinds_and_mask():
    weights = torch.tensor([2.0, 0.1, 1.5, 0.3, 9.0, 0.0, 5.0])
    kinds = torch.tensor([G, T, G, T, U, O, T])
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 0])  # the masked template token would spoil it
    assert kind_separation_auc(weights, kinds, mask) == 1.0
    assert kind_separation_auc(weights, kinds) == pytest.approx(4 / 6)
    assert kind_separation_auc(weights, kinds, positive="grounded", negative="unrelated") == 0.0
    with pytest.raises(ValueError, match="unknown token kind"):
        kind_separation_auc(weights, kinds, negative="glue")


@pytest.mark.parametrize("scores,labels,message", [
    ([1, 2], [1, 1], "both classes"),
    ([1, float("nan")], [1, 0], "finite"),
    ([1, 2, 3], [1, 0], "one length"),
    ([1, 2], [2, 0], "0/1"),
])
def test_bad_auc_inputs_are_refused(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        roc_auc(scores, labels)


def test_spread_and_paired_differences():
    s = spread([1.0, 2.0, 3.0, 4.0])
    assert (s.mean, s.n) == (2.5, 4) and s.sd == pytest.approx(math.sqrt(5 / 3), abs=1e-15)
    assert spread([0.7]).sd is None and spread([0.7]).mean == 0.7
    seeds, diffs = paired_differences({1: 0.5, 2: 0.4, 3: 0.9}, {2: 0.6, 3: 1.0, 4: 0.0})
    assert seeds == [2, 3] and diffs == pytest.approx([-0.2, -0.1])
    with pytest.raises(ValueError, match="no values"):
        spread([])
    with pytest.raises(ValueError, match="non-finite"):
        spread([1.0, float("nan")])
