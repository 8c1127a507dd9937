"""brainfuse.moe: routing, missing modalities, auxiliary losses, presets. Tiny shapes, CPU, fixed seeds."""
import math

import pytest
import torch

from brainfuse import moe
from brainfuse.moe import (PRESETS, ModalitySpec, MoEConfig, Router, balance_loss, build_model, combination_index,
                           cv_squared, entropy_regulariser, gate_scores, prob_in_top_k, specialization_loss,
                           switch_loss, top_k_softmax, z_loss)

torch.set_num_threads(1)

# aMRI through the ViT with a spatial size that is not a multiple of the 4^3 patch; DTI through the CNN.
MODS = [ModalitySpec("aMRI", "volume", (2, 13, 15, 11), "vit"), ModalitySpec("DTI", "volume", (4, 12, 12, 12), "cnn"),
        ModalitySpec("clinical", "tabular", (6,)), ModalitySpec("serum", "tabular", (5,))]
SMALL = dict(d_model=32, expert_hidden=32, mlp_hidden=32, cnn_channels=(8, 16), vit_depth=1)


def every_combination(M, repeats=2):
    """(repeats * (2^M - 1), M) presence mask holding every non-empty combination."""
    ids = torch.arange(1, 2 ** M).repeat(repeats)
    return ((ids[:, None] >> torch.arange(M)) & 1).bool()


def batch(mods, present, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m.name: torch.randn(present.shape[0], *m.shape, generator=g) for m in mods}


def model(preset, **kw):
    torch.manual_seed(0)
    return build_model(preset, MODS, 2, **{**SMALL, **kw})


# --------------------------------------------------------------------------------------- model properties
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_parameter_is_registered_and_gets_a_gradient(preset):
    # From the task loss alone (aux weights off), so routers must be trained through the prediction;
    # NaN in absent rows must not reach any gradient.
    m = model(preset, aux_weights={}).train()
    present = every_combination(len(MODS))
    inputs = batch(MODS, present)
    for j, spec in enumerate(MODS):
        inputs[spec.name][~present[:, j]] = float("nan")
    out = m(inputs, present, torch.arange(present.shape[0]) % 2)
    assert out.aux_loss.item() == 0.0
    out.loss.backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert no_grad == []
    # Registered: a second model with other weights reproduces the first exactly from its state_dict alone,
    # so no tensor that shapes the output (FuseMoE's routers in a Python list) lives outside it.
    other = build_model(preset, MODS, 2, **SMALL)
    other.load_state_dict(m.state_dict())
    m.eval(), other.eval()
    inputs = batch(MODS, present, seed=1)
    assert torch.equal(m(inputs, present).prediction, other(inputs, present).prediction)
    if m.cfg.fusion == "moe":
        router_params = {id(p) for r in m.routers for p in r.parameters()}
        assert router_params and router_params <= {id(p) for p in m.parameters()}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_eval_is_deterministic_and_noise_only_in_training(preset):
    m = model(preset)
    present = every_combination(len(MODS), 1)
    inputs = batch(MODS, present)
    m.eval()
    with torch.no_grad():
        a, b = m(inputs, present), m(inputs, present)
    assert torch.equal(a.prediction, b.prediction)
    for name in a.routing_weights:
        assert torch.equal(a.routing_weights[name], b.routing_weights[name])
    if m.cfg.noise_std > 0:  # the noisy presets do route differently from call to call while training
        m.train()
        with torch.no_grad():
            c, d = m(inputs, present), m(inputs, present)
        assert any(not torch.equal(c.routing_weights[n], d.routing_weights[n]) for n in c.routing_weights)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_absent_modality_input_does_not_change_output(preset):
    m = model(preset).eval()
    present = every_combination(len(MODS), 1)
    inputs = batch(MODS, present)
    changed = {k: v.clone() for k, v in inputs.items()}
    for j, spec in enumerate(MODS):
        changed[spec.name][~present[:, j]] = float("nan")  # absent rows: garbage, NaN included
    with torch.no_grad():
        ref, out = m(inputs, present), m(changed, present)
    assert torch.equal(ref.prediction, out.prediction)
    for name in ref.routing_weights:
        assert torch.equal(ref.routing_weights[name], out.routing_weights[name])
    # Not vacuous: changing a *present* modality does change the prediction of the samples that have it.
    used = m.names[0]
    j = [s.name for s in MODS].index(used)
    changed[used] = changed[used] + 3.0
    with torch.no_grad():
        moved = (m(changed, present).prediction - ref.prediction).abs().sum(1)
    assert (moved[present[:, j]] > 1e-6).all() and (moved[~present[:, j]] == 0).all()


@pytest.mark.parametrize("router,gate,missing", [("joint", "gaussian", "zeros"), ("disjoint", "laplace", "bank"),
                                                 ("per_modality", "gaussian", "learned")])
def test_other_topologies_train_every_parameter_and_ignore_absent_inputs(router, gate, missing):
    """Router topologies, gates and fills that no preset uses get the same guarantees."""
    m = model("fusemoe", router=router, gate=gate, missing=missing, top_k=3, mixer_layers=1,
              aux_weights={}).train()
    present = every_combination(len(MODS))
    inputs = batch(MODS, present)
    m(inputs, present, torch.arange(present.shape[0]) % 2).loss.backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []
    changed = {k: torch.where(present[:, j].view(-1, *[1] * (v.ndim - 1)), v, float("nan"))
               for j, (k, v) in enumerate(inputs.items())}
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(inputs, present).prediction, m(changed, present).prediction)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_bf16_autocast_routes_in_float32_with_finite_gradients(preset):
    """The GPU path (bf16 autocast), exercised on CPU: routers stay float32 (bf16 distances and top-k
    misroute), the loss and every gradient are finite, routing weights still sum to 1."""
    m = model(preset).train()
    present = every_combination(len(MODS))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(batch(MODS, present), present, torch.arange(present.shape[0]) % 2)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in m.parameters())
    for w in out.routing_weights.values():
        assert w.dtype == torch.float32 and torch.allclose(w.sum(-1), torch.ones(len(w)), atol=1e-6)


def test_modality_absent_from_whole_batch_may_be_left_out_of_inputs():
    m = model("fusemoe").eval()
    present = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    inputs = batch(MODS, present)
    with torch.no_grad():
        full, partial = m(inputs, present), m({k: v for k, v in inputs.items() if k != "DTI"}, present)
    assert torch.equal(full.prediction, partial.prediction)


def test_sample_with_no_modality_and_wrong_shape_are_clear_errors():
    m = model("late")
    present = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="1 samples have none"):
        m(batch(MODS, present), present)
    present[1, 2] = True
    inputs = batch(MODS, present)
    inputs["aMRI"] = torch.randn(2, 2, 13, 15, 12)
    with pytest.raises(ValueError, match="aMRI.*shape"):
        m(inputs, present)
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("nope", MODS, 2)
    with pytest.raises(ValueError, match="conditioned.*clinical"):
        build_model("neuromoe", MODS[:2], 2)


# ------------------------------------------------------------------------------------------------- routing
def test_gate_scores_match_their_formulas():
    x = torch.tensor([[1.0, 2.0]])
    w = torch.tensor([[1.0, 2.0], [4.0, 6.0], [0.0, 0.0]])
    assert torch.allclose(gate_scores(x, w, "softmax"), torch.tensor([[5.0, 16.0, 0.0]]))
    assert torch.allclose(gate_scores(x, w, "laplace"), torch.tensor([[0.0, -5.0, -math.sqrt(5.0)]]), atol=1e-5)
    assert torch.allclose(gate_scores(x, w, "gaussian"), torch.tensor([[0.0, -25.0, -5.0]]))
    # Laplace at x == w_i (distance 0) still has a finite gradient.
    x.requires_grad_(True)
    gate_scores(x, w, "laplace").sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("learned_noise", [False, True])
@pytest.mark.parametrize("gate", ["softmax", "laplace", "gaussian"])
@pytest.mark.parametrize("k", [1, 2, 3, None])
def test_top_k_weights_sum_to_one_with_exactly_k_nonzero(gate, k, learned_noise):
    torch.manual_seed(0)
    E = 5
    cfg = MoEConfig(MODS, gate=gate, top_k=k, n_experts=E, noise_std=0.5, learned_noise=learned_noise)
    router = Router(8, E, cfg).train()
    if learned_noise:  # away from its zero initialisation, so the noise really depends on x
        torch.nn.init.normal_(router.noise_weight)
    r = router(torch.randn(64, 8))
    assert torch.allclose(r.weights.sum(-1), torch.ones(64), atol=1e-6)
    assert ((r.weights > 0).sum(-1) == (k or E)).all()
    assert torch.equal(r.dispatch, r.weights > 0)
    if k is not None:  # the selected experts are the k largest of the (noisy) scores, weights softmax over them
        vals, idx = r.weights.topk(k, -1)
        assert torch.equal(torch.zeros_like(r.weights).scatter(-1, idx, vals), r.weights)
        # the smooth load estimate (probabilities, differentiable in the clean scores), not the 0/1 dispatch
        assert ((r.load >= 0) & (r.load <= 1)).all() and ((r.load > 0.01) & (r.load < 0.99)).any()
    router.eval()  # no noise: the selection is the top k of the clean scores
    r = router(torch.randn(64, 8))
    assert torch.equal(r.dispatch, torch.zeros_like(r.dispatch).scatter(-1, r.logits.topk(k or E, -1).indices, True))
    assert torch.equal(r.load, r.dispatch.float())


def test_dispatch_counts_selected_experts_whose_weight_underflows():
    """Gaussian scores far apart: the second choice's softmax weight is exactly 0 in float32, but it was
    selected, and load balancing must count it (deciding by weights > 0 would not)."""
    cfg = MoEConfig(MODS, gate="gaussian", top_k=2, n_experts=3)
    router = Router(1, 3, cfg).eval()
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[0.0], [20.0], [40.0]]))
    with torch.no_grad():
        r = router(torch.zeros(1, 1))                      # scores 0, -400, -1600
    assert r.weights.tolist() == [[1.0, 0.0, 0.0]]
    assert r.dispatch.tolist() == [[True, True, False]]
    assert math.isclose(float(switch_loss(r.logits.softmax(-1), r.dispatch)), 3 * 0.5, rel_tol=1e-6)


def test_top_k_softmax_by_hand():
    w = top_k_softmax(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 2)
    e = math.exp(1.0)
    assert torch.allclose(w, torch.tensor([[0.0, e / (e + 1), 1 / (e + 1), 0.0]]))


def test_smooth_load_is_the_probability_of_staying_in_top_k():
    """E over the noise of 'expert i is in the top k' equals E of prob_in_top_k (Monte Carlo, 20k draws)."""
    torch.manual_seed(0)
    clean = torch.tensor([[0.3, 0.0, -0.2, 0.5, 0.1]]).expand(20000, 5)
    noisy = clean + torch.randn_like(clean)
    indicator = torch.zeros_like(noisy).scatter(-1, noisy.topk(2, -1).indices, 1.0).mean(0)
    smooth = prob_in_top_k(clean, noisy, 1.0, 2).mean(0)
    assert torch.allclose(indicator, smooth, atol=0.015)
    assert abs(float(indicator.sum()) - 2.0) < 1e-5


# -------------------------------------------------------------------------------------- auxiliary losses
def test_balance_loss_by_hand():
    w = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])  # mean weights 0.6, 0.25, 0.15
    expected = ((0.6 - 1 / 3) ** 2 + (0.25 - 1 / 3) ** 2 + (0.15 - 1 / 3) ** 2) / 3
    assert math.isclose(float(balance_loss(w)), expected, rel_tol=1e-5)
    assert float(balance_loss(torch.full((4, 3), 1 / 3))) < 1e-12


def test_cv_squared_importance_and_load_by_hand():
    assert math.isclose(float(cv_squared(torch.tensor([1.0, 2.0, 3.0]))), 1.0 / 4.0, rel_tol=1e-6)  # var 1, mean 2
    # Importance = column sums of routing weights; load = number of samples dispatched to each expert.
    w = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.9, 0.1], [0.5, 0.5, 0.0]])
    importance, load = w.sum(0), (w > 0).float().sum(0)       # [1.1, 1.8, 0.1], [2, 3, 1]
    m_i = (1.1 + 1.8 + 0.1) / 3
    var_i = ((1.1 - m_i) ** 2 + (1.8 - m_i) ** 2 + (0.1 - m_i) ** 2) / 2
    var_l = ((2 - 2) ** 2 + (3 - 2) ** 2 + (1 - 2) ** 2) / 2
    assert math.isclose(float(cv_squared(importance)), var_i / m_i ** 2, rel_tol=1e-5)
    assert math.isclose(float(cv_squared(load)), var_l / 2 ** 2, rel_tol=1e-6)


def test_switch_loss_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    top1 = torch.tensor([[1, 0, 0], [0, 1, 0]])               # f = [0.5, 0.5, 0], P = [0.4, 0.4, 0.2]
    assert math.isclose(float(switch_loss(probs, top1)), 3 * (0.5 * 0.4 + 0.5 * 0.4), rel_tol=1e-6)
    top2 = torch.tensor([[1, 1, 0], [0, 1, 1]])               # f = [0.25, 0.5, 0.25]
    assert math.isclose(float(switch_loss(probs, top2)), 3 * (0.25 * 0.4 + 0.5 * 0.4 + 0.25 * 0.2), rel_tol=1e-6)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp = ln 2, ln 4
    assert math.isclose(float(z_loss(logits)), (math.log(2) ** 2 + math.log(4) ** 2) / 2, rel_tol=1e-6)


def test_entropy_regulariser_by_hand():
    # Sample 1: two routers on different experts: mean H = 0, H(mean) = ln 2. Sample 2: both uniform: 0.
    probs = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
    assert math.isclose(float(entropy_regulariser(probs)), (-math.log(2) + 0.0) / 2, rel_tol=1e-6)
    # Three routers, E = 3: [.5,.5,0], [0,.5,.5], [1,0,0]; mean = [.5, 1/3, 1/6].
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]])
    mean_h = (math.log(2) + math.log(2) + 0.0) / 3
    h_mean = -(0.5 * math.log(0.5) + (1 / 3) * math.log(1 / 3) + (1 / 6) * math.log(1 / 6))
    assert math.isclose(float(entropy_regulariser(p)), mean_h - h_mean, rel_tol=1e-5)


def test_specialization_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    combo = torch.tensor([0, 4])                               # 4 mod 3 experts -> target expert 1
    ce0 = -2.0 + math.log(math.exp(2.0) + 2)
    ce1 = -1.0 + math.log(math.exp(1.0) + 2)
    assert math.isclose(float(specialization_loss(logits, combo)), (ce0 + ce1) / 2, rel_tol=1e-6)
    assert math.isclose(float(specialization_loss(logits, combo, torch.tensor([True, False]))), ce0, rel_tol=1e-6)
    assert float(specialization_loss(logits, combo, torch.tensor([False, False]))) == 0.0


def test_aux_loss_is_the_weighted_sum_of_its_parts():
    weights = {"balance": 0.3, "cv2": 0.02, "switch": 0.05, "z": 1e-3, "entropy": 0.1, "specialization": 0.2,
               "modality": 0.5}
    m = model("fusemoe", aux_weights=weights).train()
    present = every_combination(len(MODS))
    out = m(batch(MODS, present), present, torch.zeros(present.shape[0], dtype=torch.long))
    assert set(out.aux_losses) == set(moe.AUX_NAMES)
    expected = sum(weights[k] * v.item() for k, v in out.aux_losses.items())
    assert math.isclose(out.aux_loss.item(), expected, rel_tol=1e-5)
    task = torch.nn.functional.cross_entropy(out.prediction, torch.zeros(present.shape[0], dtype=torch.long))
    assert math.isclose(out.loss.item(), task.item() + expected, rel_tol=1e-5)
    assert out.aux_losses["entropy"].item() < 0          # several routers: mean H - H(mean) <= 0


@pytest.mark.parametrize("preset", ["neuromoe", "late"])
def test_modality_heads_score_each_modality_on_the_samples_that_have_it(preset):
    present = every_combination(len(MODS))
    inputs, y = batch(MODS, present), torch.arange(present.shape[0]) % 2
    m = model(preset, aux_weights={"modality": 1.0}).eval()
    out = m(inputs, present, y)
    encoded = m.encode(inputs, present)
    expected = torch.stack([torch.nn.functional.cross_entropy(head(encoded[present[:, j], j]), y[present[:, j]])
                            for j, head in enumerate(m.modality_heads)]).mean()
    assert math.isclose(out.aux_losses["modality"].item(), expected.item(), rel_tol=1e-5)
    assert math.isclose(out.loss.item(), m.task_loss(out.prediction, y).item() + out.aux_loss.item(), rel_tol=1e-5)
    # the heads are trained, the fused prediction does not depend on them
    assert all(p.grad is None for p in m.modality_heads.parameters())
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.modality_heads.parameters())
    with torch.no_grad():
        for p in m.modality_heads.parameters():
            p.add_(1.0)
    assert torch.equal(m(inputs, present).prediction, out.prediction)


def test_class_weights_enter_the_task_loss():
    present = torch.ones(4, len(MODS), dtype=torch.bool)
    inputs, y = batch(MODS, present), torch.tensor([0, 0, 0, 1])
    m = model("late", class_weights=(1.0, 3.0)).eval()
    logits = m(inputs, present).prediction
    expected = torch.nn.functional.cross_entropy(logits, y, weight=torch.tensor([1.0, 3.0]))
    assert math.isclose(m(inputs, present, y).loss.item(), expected.item(), rel_tol=1e-6)


# ------------------------------------------------------------------------------------ missing modalities
def test_combination_index_by_hand():
    present = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 1]], dtype=torch.bool)
    assert combination_index(present).tolist() == [0, 5, 6, 3]   # bits 1, 6, 7, 4 minus 1


def test_bank_covers_every_combination():
    M, d = 3, 4
    bank = moe.MissingModality("bank", M, d)
    present = every_combination(M, 1)                              # all 7 non-empty combinations
    combo = combination_index(present)
    assert sorted(combo.tolist()) == list(range(2 ** M - 1))
    # One row per (combination, absent modality): 3 * 7 - 12 present slots = 9 rows, each used exactly once.
    assert bank.table.shape == (M * (2 ** M - 1) - M * 2 ** (M - 1), d)
    emb = torch.randn(2 ** M - 1, M, d)
    out = bank(emb, present, combo)
    used = []
    for b in range(present.shape[0]):
        for m in range(M):
            if present[b, m]:
                assert torch.equal(out[b, m], emb[b, m])
            else:
                row = int(bank.index[combo[b], m])
                assert row >= 0 and torch.equal(out[b, m], bank.table[row])
                used.append(row)
    assert sorted(used) == list(range(bank.table.shape[0]))
    assert (bank.index[combination_index(torch.ones(1, M, dtype=torch.bool))] == -1).all()  # complete: no rows


def test_learned_and_zero_fill():
    present = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)
    emb = torch.randn(2, 2, 3)
    learned = moe.MissingModality("learned", 2, 3)
    out = learned(emb, present, combination_index(present))
    assert torch.equal(out[0, 1], learned.table[1]) and torch.equal(out[1, 0], learned.table[0])
    assert torch.equal(out[0, 0], emb[0, 0])
    zeros = moe.MissingModality("zeros", 2, 3)(emb, present, combination_index(present))
    assert (zeros[0, 1] == 0).all() and torch.equal(zeros[1, 1], emb[1, 1])


# ----------------------------------------------------------------------------------------------- encoders
def test_input_pool_averages_blocks_and_shrinks_the_encoders_grid():
    pool = moe.AvgPool3d((5, 4, 1), 2)
    x = torch.arange(20.0).view(1, 1, 5, 4, 1)
    y = pool(x)
    assert pool.out_shape == (3, 2, 1) and y.shape == (1, 1, 3, 2, 1)
    assert y[0, 0, 0, 0, 0] == x[0, 0, :2, :2, 0].mean()
    assert y[0, 0, 2, 1, 0] == x[0, 0, 4, 2:4, 0].mean()      # edge block: only its own voxels
    m = model("neuromoe", input_pool=2)
    assert m.encoders["aMRI"][1].grid == (2, 2, 2)           # 13x15x11 -> 7x8x6 -> 4^3 patches
    present = every_combination(len(MODS), 1)
    inputs = batch(MODS, present)
    m.eval()
    with torch.no_grad():
        out = m(inputs, present).prediction
        inputs["aMRI"] = inputs["aMRI"] + 3.0                 # still sees its (pooled) input
        assert (m(inputs, present).prediction != out).any()
    with pytest.raises(ValueError, match="input_pool"):
        MoEConfig(MODS, input_pool=0)


def test_conditioned_gate_sees_which_modalities_are_present():
    m = model("neuromoe").eval()
    present = torch.ones(2, len(MODS), dtype=torch.bool)
    present[1, 0] = False                                  # same clinical features, aMRI absent in sample 2
    inputs = batch(MODS, present)
    inputs = {k: v[:1].expand(2, *v.shape[1:]) for k, v in inputs.items()}
    with torch.no_grad():
        w = m(inputs, present).routing_weights["conditioned"]
    assert not torch.allclose(w[0], w[1])


def test_vit_handles_non_multiple_sizes_and_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    vit = moe.ViT3D(2, (13, 15, 11), 16, 4, 2, 4)
    assert vit.grid == (4, 4, 3)
    x = torch.randn(2, 2, 13, 15, 11)
    vit(x).sum().backward()
    grads = [p.grad.clone() for p in vit.parameters()]
    vit.zero_grad()
    vit.grad_checkpoint = True
    vit(x).sum().backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(grads, vit.parameters()))


def test_config_round_trips_through_plain_data():
    cfg = moe.preset_config("flexmoe", MODS, 3, task="classification", class_weights=(1.0, 2.0, 1.0))
    again = MoEConfig(**cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match="unknown MoEConfig fields"):
        moe.preset_config("flexmoe", MODS, 3, topk=2)


# ---------------------------------------------------------------------------------------------- learning
def synthetic(n, seed, task="classification"):
    """Every modality carries the label: a shifted 4^3 cube in each volume, shifted features in tabular ones.
    25 % of each modality missing at random (at least one present per sample)."""
    g = torch.Generator().manual_seed(seed)
    mods = [ModalitySpec("aMRI", "volume", (1, 12, 12, 12)), ModalitySpec("DTI", "volume", (2, 10, 11, 9)),
            ModalitySpec("clinical", "tabular", (6,)), ModalitySpec("serum", "tabular", (4,))]
    z = torch.randn(n, generator=g)                            # latent severity
    y = (z > 0).long() if task == "classification" else z
    signal = 1.5 * torch.sign(z) if task == "classification" else z
    inputs = {m.name: torch.randn(n, *m.shape, generator=g) for m in mods}
    inputs["aMRI"][:, :, 4:8, 4:8, 4:8] += signal[:, None, None, None, None]
    inputs["DTI"][:, 0, 2:6, 2:6, 2:6] += signal[:, None, None, None]
    inputs["clinical"][:, :2] += signal[:, None]
    inputs["serum"][:, :2] += signal[:, None]
    present = torch.rand(n, len(mods), generator=g) > 0.25
    present[~present.any(1), 0] = True
    return mods, inputs, present, y


def fit(preset, task, steps=50):
    mods, inputs, present, y = synthetic(192, 0, task)
    torch.manual_seed(0)
    m = build_model(preset, mods, 2 if task == "classification" else 1, task=task, **SMALL)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randperm(192, generator=g)[:32]
        m.train()
        out = m({k: v[idx] for k, v in inputs.items()}, present[idx], y[idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    _, inputs, present, y = synthetic(256, 99, task)
    m.eval()
    with torch.no_grad():
        out = m(inputs, present)
    return out, present, y


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_learns_a_synthetic_multimodal_task(preset):
    out, present, y = fit(preset, "classification")
    acc = float((out.prediction.argmax(1) == y).float().mean())
    # Chance is ~0.5. "single" sees only aMRI, absent for a quarter of the samples: expect ~0.5 there.
    assert acc > (0.75 if preset == "single" else 0.85), acc
    if out.routing_weights:  # weights are valid distributions on held-out data too
        for w in out.routing_weights.values():
            assert torch.allclose(w.sum(-1), torch.ones(len(y)), atol=1e-5)


def test_regression_head_learns():
    out, present, y = fit("permmoe", "regression", steps=60)
    pred = out.prediction.squeeze(1)
    r2 = 1 - float(((pred - y) ** 2).mean() / y.var())
    assert out.prediction.shape == (len(y), 1) and r2 > 0.5, r2


@pytest.mark.parametrize("preset", ["fusemoe", "flexmoe", "neuromoe"])
def test_residual_experts_start_from_the_identity(preset):
    """With every expert's FFN output zeroed, a residual MoE layer passes its input through whatever the gate does
    (weights sum to 1): the prediction is the head applied to the tokens (joint: to the fused token)."""
    present = every_combination(len(MODS))
    inputs = batch(MODS, present)
    m = model(preset).eval()
    with torch.no_grad():
        for pool in m.experts:
            for f in pool:
                f[-1].weight.zero_()
                f[-1].bias.zero_()
        tokens = m.mixer(m.missing(m.encode(inputs, present), present, combination_index(present)))
        if m.cfg.router == "joint":
            expected = m.head(m.fuse(tokens.flatten(1)))
        elif m.cfg.router == "conditioned":
            w = m(inputs, present).routing_weights["conditioned"]
            expected = m.head(torch.einsum("bm,bmd->bd", w, tokens))
        else:
            expected = m.head(tokens.flatten(1))
        torch.testing.assert_close(m(inputs, present).prediction, expected)
