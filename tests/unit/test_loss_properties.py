"""Property-based checks of every policy loss over random shapes, masks, log-probs and advantages."""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_vespo.config.schema import LossConfig
from megatron_vespo.losses import (
    AGGREGATIONS, PolicyBatch, available_losses, compute_policy_loss, normalizer_from_masks, screen, token_weights,
    vespo_phi,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite_logp = st.floats(-8.0, 0.0)
log_ratio = st.floats(-3.0, 3.0)


@st.composite
def sequences(draw, logp=finite_logp, ratio=log_ratio, max_seqs=6, max_len=7):
    """A list of sequences: (logp list, behaviour list, mask list, advantage)."""
    out = []
    for _ in range(draw(st.integers(1, max_seqs))):
        n = draw(st.integers(0, max_len))
        lp = draw(st.lists(logp, min_size=n, max_size=n))
        beh = [x - draw(ratio) for x in lp]
        mask = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        adv = draw(st.one_of(st.just(0.0), st.floats(-3.0, 3.0)))
        out.append((lp, beh, mask, adv))
    return out


class Leaf:
    """Token log-probs of all sequences in one leaf tensor (gradients of any split land here)."""

    def __init__(self, seqs):
        self.seqs = seqs
        flat = [x for s in seqs for x in s[0]]
        self.logp = torch.tensor(flat, dtype=torch.float64).requires_grad_()
        self.offsets = [0]
        for s in seqs:
            self.offsets.append(self.offsets[-1] + len(s[0]))

    def batch(self, seq_ids, perm_seed=0) -> PolicyBatch:
        tokens, index, beh, mask = [], [], [], []
        for local, i in enumerate(seq_ids):
            tokens += range(self.offsets[i], self.offsets[i + 1])
            index += [local] * len(self.seqs[i][0])
            beh += self.seqs[i][1]
            mask += self.seqs[i][2]
        perm = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(perm_seed))
        return PolicyBatch(
            logp=self.logp[torch.tensor(tokens, dtype=torch.long)[perm]],
            behavior_logp=torch.tensor(beh, dtype=torch.float64)[perm],
            mask=torch.tensor(mask, dtype=torch.bool)[perm],
            seq_index=torch.tensor(index, dtype=torch.long)[perm],
            advantages=torch.tensor([self.seqs[i][3] for i in seq_ids], dtype=torch.float64),
            num_seqs=len(seq_ids),
        )

    def run(self, groups, cfg, perm_seed=0):
        self.logp.grad = None
        batches = [self.batch(g, perm_seed) for g in groups]
        norm = normalizer_from_masks(batches, norm_constant=5.0)
        total = 0.0
        for b in batches:
            out = compute_policy_loss(b, norm, cfg)
            out.loss.backward()
            total += out.loss.item()
        grad = self.logp.grad if self.logp.grad is not None else torch.zeros_like(self.logp)
        return total, grad.clone()


@SETTINGS
@given(seqs=sequences(), name=st.sampled_from(available_losses()), aggregation=st.sampled_from(AGGREGATIONS),
       cut=st.data())
def test_finite_and_invariant_to_split_and_token_order(seqs, name, aggregation, cut):
    leaf = Leaf(seqs)
    cfg = LossConfig(name=name, aggregation=aggregation)
    ids = list(range(len(seqs)))
    loss, grad = leaf.run([ids], cfg)
    assert math.isfinite(loss) and torch.isfinite(grad).all()
    masked = torch.tensor([m for s in seqs for m in s[2]], dtype=torch.bool)
    assert (grad[~masked] == 0).all()

    k = cut.draw(st.integers(1, len(seqs)))
    order = cut.draw(st.permutations(ids))
    groups = [sorted(order[i::k]) for i in range(k)]
    split_loss, split_grad = leaf.run(groups, cfg, perm_seed=cut.draw(st.integers(0, 100)))
    assert math.isclose(split_loss, loss, rel_tol=1e-10, abs_tol=1e-12)
    torch.testing.assert_close(split_grad, grad, rtol=1e-10, atol=1e-12)


@SETTINGS
@given(seqs=sequences(), name=st.sampled_from(available_losses()), aggregation=st.sampled_from(AGGREGATIONS))
def test_zero_advantage_gives_zero_loss_and_gradient(seqs, name, aggregation):
    seqs = [(lp, b, m, 0.0) for lp, b, m, _ in seqs]
    loss, grad = Leaf(seqs).run([list(range(len(seqs)))], LossConfig(name=name, aggregation=aggregation))
    assert loss == 0.0 and (grad == 0).all()


@SETTINGS
@given(seqs=sequences(ratio=st.floats(-40.0, 40.0)), aggregation=st.sampled_from(AGGREGATIONS))
def test_vespo_gradient_is_phi_times_advantage_with_phi_detached(seqs, aggregation):
    leaf = Leaf(seqs)
    batch = leaf.batch(list(range(len(seqs))))
    norm = normalizer_from_masks([batch], norm_constant=5.0)
    out = compute_policy_loss(batch, norm, LossConfig(name="vespo", aggregation=aggregation))
    (grad,) = torch.autograd.grad(out.loss, batch.logp)
    # Explicit: log W_i = clamp(Σ clamp(ℓ − b, ±20), log 1e-8, 20); φ from the branch of A_i; ∇ = −φ A w.
    r = (batch.logp.detach() - batch.behavior_logp).clamp(-20, 20) * batch.mask
    log_w = torch.zeros(batch.num_seqs, dtype=torch.float64).index_add_(0, batch.seq_index, r)
    log_w = log_w.clamp(math.log(1e-8), 20.0)
    adv = batch.advantages
    phi = torch.where(adv >= 0, vespo_phi(log_w, 2.0, 3.0), vespo_phi(log_w, 3.0, 2.0))
    weights = token_weights(screen(batch), norm, aggregation)
    expected = -(phi * adv)[batch.seq_index] * weights
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-14)


@SETTINGS
@given(seqs=sequences(logp=st.one_of(st.floats(-1e4, 0.0), st.sampled_from([math.nan, math.inf, -math.inf])),
                      ratio=st.floats(-1e4, 1e4)),
       name=st.sampled_from(available_losses()), aggregation=st.sampled_from(AGGREGATIONS))
def test_extreme_and_non_finite_inputs_stay_finite_and_bad_sequences_are_counted(seqs, name, aggregation):
    leaf = Leaf(seqs)
    batch = leaf.batch(list(range(len(seqs))))
    out = compute_policy_loss(batch, normalizer_from_masks([batch], norm_constant=5.0),
                              LossConfig(name=name, aggregation=aggregation))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(leaf.logp.grad).all()
    bad = sum(any(not math.isfinite(x) or not math.isfinite(b) for x, b, m in zip(lp, beh, mask) if m)
              for lp, beh, mask, _ in seqs)
    metrics = out.metrics.compute()
    assert metrics["loss/bad_seqs"] == bad
    assert all(math.isfinite(v) for v in metrics.values()), metrics


@SETTINGS
@given(log_w=st.floats(-1e4, 1e4), branch=st.sampled_from([(2.0, 3.0), (3.0, 2.0)]))
def test_phi_is_bounded_by_its_peak(log_w, branch):
    c1, c2 = branch
    phi = float(vespo_phi(torch.tensor(log_w, dtype=torch.float64), c1, c2))
    assert 0.0 <= phi <= (c1 / c2) ** c1 * math.exp(c2 - c1) * (1 + 1e-12)
