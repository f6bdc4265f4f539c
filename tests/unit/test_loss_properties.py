"""Property-based checks of every policy loss over random shapes, masks, log-probs and advantages,
with and without the KL-to-reference and entropy terms."""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_vespo.config.schema import KLConfig, LossConfig
from megatron_vespo.losses import (
    AGGREGATIONS, PolicyBatch, available_losses, compute_policy_loss, normalizer_from_masks, screen, token_weights,
    vespo_phi,
)
from megatron_vespo.losses.kl import KL_ESTIMATORS

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite_logp = st.floats(-8.0, 0.0)
log_ratio = st.floats(-3.0, 3.0)


@st.composite
def sequences(draw, logp=finite_logp, ratio=log_ratio, max_seqs=6, max_len=7):
    """A list of sequences: (logp list, behaviour list, mask list, advantage, reference list, entropy list)."""
    out = []
    for _ in range(draw(st.integers(1, max_seqs))):
        n = draw(st.integers(0, max_len))
        lp = draw(st.lists(logp, min_size=n, max_size=n))
        beh = [x - draw(ratio) for x in lp]
        mask = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        adv = draw(st.one_of(st.just(0.0), st.floats(-3.0, 3.0)))
        ref = [(x if math.isfinite(x) else -1.0) - draw(log_ratio) for x in lp]
        entropy = draw(st.lists(st.floats(0.0, 4.0), min_size=n, max_size=n))
        out.append((lp, beh, mask, adv, ref, entropy))
    return out


# The regularisers: off, or a KL term (any estimator) and/or an entropy bonus.
regularizers = st.tuples(st.sampled_from([0.0, 0.7]), st.sampled_from(KL_ESTIMATORS), st.sampled_from([0.0, 0.3]))


def loss_config(name="vespo", aggregation="token-mean", kl=(0.0, "k3", 0.0)) -> LossConfig:
    coef, estimator, entropy_coef = kl
    return LossConfig(name=name, aggregation=aggregation, kl=KLConfig(coef=coef, estimator=estimator),
                      entropy_coef=entropy_coef)


class Leaf:
    """Token log-probs and entropies of all sequences in two leaf tensors (gradients of any split land here)."""

    def __init__(self, seqs):
        self.seqs = seqs
        self.logp = torch.tensor([x for s in seqs for x in s[0]], dtype=torch.float64).requires_grad_()
        self.entropy = torch.tensor([x for s in seqs for x in s[5]], dtype=torch.float64).requires_grad_()
        self.offsets = [0]
        for s in seqs:
            self.offsets.append(self.offsets[-1] + len(s[0]))

    def batch(self, seq_ids, perm_seed=0) -> PolicyBatch:
        tokens, index, beh, mask, ref = [], [], [], [], []
        for local, i in enumerate(seq_ids):
            tokens += range(self.offsets[i], self.offsets[i + 1])
            index += [local] * len(self.seqs[i][0])
            beh += self.seqs[i][1]
            mask += self.seqs[i][2]
            ref += self.seqs[i][4]
        perm = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(perm_seed))
        take = torch.tensor(tokens, dtype=torch.long)[perm]
        return PolicyBatch(
            logp=self.logp[take],
            behavior_logp=torch.tensor(beh, dtype=torch.float64)[perm],
            mask=torch.tensor(mask, dtype=torch.bool)[perm],
            seq_index=torch.tensor(index, dtype=torch.long)[perm],
            advantages=torch.tensor([self.seqs[i][3] for i in seq_ids], dtype=torch.float64),
            num_seqs=len(seq_ids),
            ref_logp=torch.tensor(ref, dtype=torch.float64)[perm],
            entropy=self.entropy[take],
        )

    def run(self, groups, cfg, perm_seed=0):
        self.logp.grad = self.entropy.grad = None
        batches = [self.batch(g, perm_seed) for g in groups]
        norm = normalizer_from_masks(batches, norm_constant=5.0)
        total, metrics = 0.0, None
        for b in batches:
            out = compute_policy_loss(b, norm, cfg)
            out.loss.backward()
            total += out.loss.item()
            metrics = out.metrics if metrics is None else metrics.merge(out.metrics)
        grads = [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in (self.logp, self.entropy)]
        self.metrics = metrics.compute()
        return total, torch.cat(grads)


@SETTINGS
@given(seqs=sequences(), name=st.sampled_from(available_losses()), aggregation=st.sampled_from(AGGREGATIONS),
       kl=regularizers, cut=st.data())
def test_finite_and_invariant_to_split_and_token_order(seqs, name, aggregation, kl, cut):
    leaf = Leaf(seqs)
    cfg = loss_config(name, aggregation, kl)
    ids = list(range(len(seqs)))
    loss, grad = leaf.run([ids], cfg)
    metrics = leaf.metrics
    assert math.isfinite(loss) and torch.isfinite(grad).all()
    masked = torch.tensor([m for s in seqs for m in s[2]], dtype=torch.bool)
    assert (grad[~torch.cat([masked, masked])] == 0).all()
    if kl[2] == 0.0:  # without the bonus the entropy is reported, never differentiated
        assert (grad[len(masked):] == 0).all()

    k = cut.draw(st.integers(1, len(seqs)))
    order = cut.draw(st.permutations(ids))
    groups = [sorted(order[i::k]) for i in range(k)]
    split_loss, split_grad = leaf.run(groups, cfg, perm_seed=cut.draw(st.integers(0, 100)))
    assert math.isclose(split_loss, loss, rel_tol=1e-10, abs_tol=1e-12)
    torch.testing.assert_close(split_grad, grad, rtol=1e-10, atol=1e-12)
    for name in ("loss/kl", "loss/entropy", "loss/policy_loss"):  # the reported terms are split-invariant too
        assert math.isclose(leaf.metrics[name], metrics[name], rel_tol=1e-10, abs_tol=1e-12)


@settings(SETTINGS, max_examples=60)
@given(seqs=sequences(), aggregation=st.sampled_from(AGGREGATIONS), kl=regularizers)
def test_kl_and_entropy_terms_have_the_estimators_gradient(seqs, aggregation, kl):
    """Zero advantages leave only the regularisers: ∂/∂ℓ_t = coef · w_t · k'(d_t) with d = ℓ − log π_ref
    (k1' = 1, k2' = d, k3' = 1 − e^{−d}), and ∂/∂H_t = −entropy_coef · w_t, w the aggregation's weights."""
    seqs = [(lp, b, m, 0.0, ref, ent) for lp, b, m, _, ref, ent in seqs]
    coef, estimator, entropy_coef = kl
    leaf = Leaf(seqs)
    batch = leaf.batch(list(range(len(seqs))))
    norm = normalizer_from_masks([batch], norm_constant=5.0)
    out = compute_policy_loss(batch, norm, loss_config("vespo", aggregation, kl))
    grad_logp, grad_entropy = (g if g is not None else torch.zeros_like(t) for g, t in zip(
        torch.autograd.grad(out.loss, [batch.logp, batch.entropy], allow_unused=True), [batch.logp, batch.entropy]))
    weights = token_weights(screen(batch), norm, aggregation)
    d = batch.logp.detach() - batch.ref_logp
    slope = {"k1": torch.ones_like(d), "k2": d, "k3": 1.0 - torch.exp(-d)}[estimator]
    torch.testing.assert_close(grad_logp, coef * weights * slope, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad_entropy, -entropy_coef * weights, rtol=1e-10, atol=1e-14)
    kl_value = float((weights * {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) - 1 + d}[estimator]).sum())
    metrics = out.metrics.compute()
    assert math.isclose(metrics["loss/kl"], kl_value, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(metrics["loss/entropy"], float((weights * batch.entropy.detach()).sum()),
                        rel_tol=1e-9, abs_tol=1e-12)


@SETTINGS
@given(seqs=sequences(), name=st.sampled_from(available_losses()), aggregation=st.sampled_from(AGGREGATIONS))
def test_zero_advantage_gives_zero_loss_and_gradient(seqs, name, aggregation):
    seqs = [(lp, b, m, 0.0, ref, ent) for lp, b, m, _, ref, ent in seqs]
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
              for lp, beh, mask, *_ in seqs)
    metrics = out.metrics.compute()
    assert metrics["loss/bad_seqs"] == bad
    assert all(math.isfinite(v) for v in metrics.values()), metrics


@SETTINGS
@given(log_w=st.floats(-1e4, 1e4), branch=st.sampled_from([(2.0, 3.0), (3.0, 2.0)]))
def test_phi_is_bounded_by_its_peak(log_w, branch):
    c1, c2 = branch
    phi = float(vespo_phi(torch.tensor(log_w, dtype=torch.float64), c1, c2))
    assert 0.0 <= phi <= (c1 / c2) ** c1 * math.exp(c2 - c1) * (1 + 1e-12)
